"""CUDA graphs (matten/cuda_graph.py): sampling and the training step replayed give the eager results."""

import pytest
import torch

from matten import create_model
from matten.cuda_graph import CUDAGraphForward, CUDAGraphTrainStep
from matten.diffusion import make_scheduler
from matten.pipeline import MattenPipeline

SMALL = dict(depth=4, hidden_size=64, num_heads=2, patch_size=2, in_channels=4, num_frames=4, sample_size=8,
             num_classes=3, class_dropout_prob=0.1, learn_sigma=True)


def _pipe(device):
    torch.manual_seed(0)
    model = create_model("Matten-T/2", **SMALL).to(device).eval()
    with torch.no_grad():  # no adaLN-Zero identities: every block does work
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    pipe = MattenPipeline(transformer=model, scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_needs_cuda():
    pipe = _pipe("cpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        pipe(batch_size=1, class_labels=0, num_inference_steps=2, output_type="latent", cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA tensor"):
        CUDAGraphForward(pipe.transformer)(torch.zeros(1, 4, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_graph_forward_matches_eager_gpu(autocast):
    model = _pipe("cuda").transformer
    graphed = CUDAGraphForward(model)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    # fp32: the same kernels on the same inputs; bf16 autocast: cuBLAS may pick other algorithms inside a capture, so
    # the two agree to bf16 rounding through the depth (the dtype check shows the graph ran under the autocast too)
    tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for step in range(3):  # replays with new inputs after the capture
        x = torch.randn(2, 4, 4, 8, 8, device="cuda")
        t = torch.full((2,), 900.0 - 300 * step, device="cuda")
        y = torch.tensor([step % 3, 3], device="cuda")
        with ctx, torch.no_grad():
            want = model(x, t, class_labels=y).sample
            got = graphed(x, t, y)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    # a new batch size re-captures
    x = torch.randn(3, 4, 4, 8, 8, device="cuda")
    t, y = torch.full((3,), 10.0, device="cuda"), torch.tensor([0, 1, 2], device="cuda")
    with ctx, torch.no_grad():
        torch.testing.assert_close(graphed(x, t, y), model(x, t, class_labels=y).sample, **tol)


@pytest.mark.gpu
def test_pipeline_with_graph_matches_eager_gpu():
    pipe = _pipe("cuda")
    kw = dict(batch_size=2, class_labels=1, num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    eager = pipe(generator=torch.Generator("cuda").manual_seed(0), **kw).frames
    graphed = pipe(generator=torch.Generator("cuda").manual_seed(0), cuda_graph=True, **kw).frames
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def _train_fn(model):
    def fn(x, t, y, target):
        out = model(x, t, class_labels=y).sample
        return {"loss": ((out.float() - target) ** 2).mean(), "out": out}
    return fn


def test_train_step_needs_cuda():
    model = _pipe("cpu").transformer
    step = CUDAGraphTrainStep(model.parameters(), _train_fn(model))
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        step(torch.zeros(1, 4, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, 8, 4, 8, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_graph_train_step_matches_eager_gpu(autocast):
    # two copies of one model (no label dropout: the graph's warm-up steps would shift the RNG's draws), one trained
    # eagerly, one through the graph, three AdamW steps on new batches: losses, every gradient and the weights agree
    # (fp32: the same kernels; bf16 autocast: to bf16 rounding, cuBLAS may choose other algorithms in a capture)
    torch.manual_seed(0)
    eager = create_model("Matten-T/2", **dict(SMALL, class_dropout_prob=0.0)).cuda().train()
    with torch.no_grad():
        for p in eager.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    graphed = create_model("Matten-T/2", **dict(SMALL, class_dropout_prob=0.0)).cuda().train()
    graphed.load_state_dict(eager.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (eager, graphed)]
    step = CUDAGraphTrainStep(graphed.parameters(), _train_fn(graphed))
    ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)  # noqa: E731

    def close(got, want, what):
        if autocast:  # relative to the tensor's norm: bf16 rounding differences, not elementwise exactness
            err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
            assert err < 3e-2, f"{what}: relative error {err:.2e}"
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")

    for i in range(3):
        x = torch.randn(2, 4, 4, 8, 8, device="cuda")
        t = torch.randint(0, 1000, (2,), device="cuda")
        y = torch.tensor([i % 3, (i + 1) % 3], device="cuda")
        target = torch.randn(2, 8, 4, 8, 8, device="cuda")
        opts[0].zero_grad(set_to_none=True)
        with ctx():
            want = _train_fn(eager)(x, t, y, target)
        want["loss"].backward()
        opts[1].zero_grad(set_to_none=True)  # the graph's call sets the gradients again
        with ctx():
            got = step(x, t, y, target)
        close(got["loss"], want["loss"].detach(), "loss")
        assert got["out"].dtype == want["out"].dtype
        for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
            assert b.grad is not None, name
            close(b.grad, a.grad, f"grad of {name}")
        for opt in opts:
            opt.step()
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        close(b.detach(), a.detach(), name)
