"""Sampling through a captured CUDA graph (matten/cuda_graph.py): the same outputs as the eager forward."""

import pytest
import torch

from matten import create_model
from matten.cuda_graph import CUDAGraphForward
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
