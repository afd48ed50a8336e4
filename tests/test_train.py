"""Training on the CPU: loss goes down on a fixed batch, checkpoints hold no pickles and resume bit-exactly,
EMA, gradient checkpointing, a 2-process DDP (gloo) run, training through a VAE.

Tolerance rule: resumed vs uninterrupted runs and the two DDP ranks must agree exactly (same ops in the same order on
the CPU); gradient checkpointing recomputes the same float32 ops, so gradients agree to 1e-6 relative.
"""

import argparse
import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from matten import create_model
from matten.data import SyntheticShapesDataset
from matten.diffusion import GaussianDiffusion
from matten.ema import EMA
from matten.train import add_arguments, train, training_step

TINY = ["--preset", "Matten-T/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--num-frames", "2",
        "--image-size", "4", "--kernel-backend", "ref", "--device", "cpu", "--no-progress"]
TINY_MODEL = dict(depth=2, hidden_size=32, num_heads=2, num_frames=2, sample_size=4, in_channels=3,
                  kernel_backend="ref")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("Matten-T/2", num_classes=4, class_dropout_prob=0.0, **TINY_MODEL)
    ds = SyntheticShapesDataset(num_frames=2, size=4, length=8)
    batch = [ds[i] for i in range(4)]
    x0 = torch.stack([b["video"] for b in batch])
    labels = torch.stack([b["label"] for b in batch])
    diff = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([50, 200, 400, 800])
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = training_step(model, diff, x0, labels, g, t=t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("losses:", [round(x, 4) for x in losses])
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_ema_update_and_schedule():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup_steps=2, warmup_decay=0.5)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # warm-up decay 0.5
    torch.testing.assert_close(ema.model.weight, 0.5 * before + 0.5 * model.weight)
    assert ema.decay_at(1) == 0.5 and ema.decay_at(2) == 0.9
    paper = EMA.paper(model)
    assert paper.decay_at(49_999) == 0.99 and paper.decay_at(50_000) == 0.9999
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("Matten-T/2", **TINY_MODEL)
    x0 = torch.randn(2, 3, 2, 4, 4)
    t, noise = torch.tensor([10, 600]), torch.randn(2, 3, 2, 4, 4)
    diff = GaussianDiffusion()
    grads = []
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        training_step(model, diff, x0, None, None, t=t, noise=noise)["loss"].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    print("grad max diff with checkpointing:", (grads[0] - grads[1]).abs().max().item())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def _run(tmp, name, steps, *extra):
    args = parse(TINY + ["--data", "synthetic", "--class-conditional", "--steps", str(steps), "--batch-size", "2",
                         "--output", str(tmp / name), "--checkpoint-every", "2", "--log-every", "1",
                         "--synthetic-length", "6", "--ema-decay", "0.9", *extra])
    return train(args)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    # 6 clips / batch 2 = 3 steps per epoch: the interruption at step 2 falls inside an epoch, step 4 crosses one
    _run(tmp_path, "straight", 5)
    _run(tmp_path, "resumed", 2)
    _run(tmp_path, "resumed", 5, "--resume")
    a = os.path.join(tmp_path, "straight", "checkpoints", "step_0000005")
    b = os.path.join(tmp_path, "resumed", "checkpoints", "step_0000005")
    for name in ("model", "ema", "optimizer", "rng_rank0"):
        ta, tb = load_file(os.path.join(a, f"{name}.safetensors")), load_file(os.path.join(b, f"{name}.safetensors"))
        assert ta.keys() == tb.keys()
        diffs = {k: (ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].numel()}
        print(name, "max diff", max(diffs.values()))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    # the loss log of the resumed run continues the same curve
    with open(tmp_path / "straight" / "loss.csv") as fa, open(tmp_path / "resumed" / "loss.csv") as fb:
        log = fa.read()
        assert log == fb.read()
    # the log holds the gradient norm before clipping, for divergence diagnostics
    header, *rows = log.strip().splitlines()
    assert header == "step,loss,mse,vb,grad_norm" and len(rows) == 5
    assert all(0 < float(r.split(",")[4]) < float("inf") for r in rows)
    # checkpoints are safetensors + JSON only (no pickled code), and the EMA export loads with from_pretrained
    files = set(os.listdir(a))
    assert files == {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng_rank0.safetensors",
                     "state.json"}
    with open(os.path.join(a, "state.json")) as fh:
        assert json.load(fh)["step"] == 5
    from matten import MattenTransformer3DModel

    ema = MattenTransformer3DModel.from_pretrained(tmp_path / "straight" / "ema")
    ema_ckpt = load_file(os.path.join(a, "ema.safetensors"))
    assert all(torch.equal(v, ema_ckpt[k]) for k, v in ema.state_dict().items())
    assert sorted(os.listdir(tmp_path / "straight" / "checkpoints")) == ["latest", "step_0000004", "step_0000005"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = train(parse(argv))
    named = {f"param.{k}": p.detach().contiguous() for k, p in summary["model"].named_parameters()}
    flat = torch.cat([p.detach().flatten() for p in summary["model"].parameters()])
    save_file({"params": flat, "loss": torch.tensor([summary["final_loss"]]), **named},
              os.path.join(out_dir, f"rank{rank}.safetensors"))


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    argv = TINY + ["--data", "synthetic", "--steps", "3", "--batch-size", "2", "--output", str(tmp_path / "ddp"),
                   "--checkpoint-every", "2", "--log-every", "1", "--synthetic-length", "16"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    # the ranks see different clips and noise: equal weights after 3 steps mean the gradients were all-reduced
    print("rank0 vs rank1 max diff", (r0["params"] - r1["params"]).abs().max().item(), "loss", r0["loss"].item())
    assert torch.equal(r0["params"], r1["params"])
    assert torch.isfinite(r0["loss"]).all()
    init = torch.cat([p.detach().flatten() for p in _init_model().parameters()])
    assert not torch.equal(init, r0["params"])
    ckpt = os.path.join(tmp_path, "ddp", "checkpoints", "step_0000003")
    assert sorted(os.listdir(ckpt)) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                        "rng_rank0.safetensors", "rng_rank1.safetensors", "state.json"]
    saved = load_file(os.path.join(ckpt, "model.safetensors"))  # rank 0's weights, identical to the live ones
    names = [k[len("param."):] for k in r0 if k.startswith("param.")]
    assert names and all(torch.equal(saved[n], r0["param." + n]) for n in names)
    with open(os.path.join(ckpt, "state.json")) as fh:
        assert json.load(fh)["world_size"] == 2


def _init_model():
    torch.manual_seed(0)
    return create_model("Matten-T/2", **TINY_MODEL)


def test_train_through_a_vae(tmp_path):
    from diffusers import AutoencoderKL

    av = pytest.importorskip("av")  # noqa: F841
    from matten.video_io import write_mp4

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=8, scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    for cls in ("a", "b"):
        (tmp_path / "videos" / cls).mkdir(parents=True)
        for i in range(2):
            write_mp4(torch.randint(0, 255, (6, 12, 12, 3), dtype=torch.uint8).numpy(),
                      tmp_path / "videos" / cls / f"{i}.mp4")
    common = ["--preset", "Matten-T/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--num-frames", "2",
              "--image-size", "8", "--kernel-backend", "ref", "--device", "cpu", "--no-progress",
              "--vae", str(tmp_path / "vae"), "--frame-interval", "2"]
    summary = train(parse(common + ["--data", str(tmp_path / "videos"), "--steps", "2", "--batch-size", "2",
                                    "--output", str(tmp_path / "run"), "--class-conditional"]))
    assert summary["model"].config.in_channels == 4 and summary["model"].config.sample_size == 4
    assert summary["model"].config.num_classes == 2
    with open(tmp_path / "run" / "ema" / "matten_sampling.json") as fh:
        assert json.load(fh)["vae"] == str(tmp_path / "vae")
    # pre-encode the latents, then train from them
    train(parse(common + ["--data", str(tmp_path / "videos"), "--steps", "0", "--batch-size", "2",
                          "--output", str(tmp_path / "unused"), "--encode-latents", str(tmp_path / "lat")]))
    summary = train(parse(common + ["--data", str(tmp_path / "lat"), "--steps", "2", "--batch-size", "2",
                                    "--output", str(tmp_path / "run2")]))
    assert summary["step"] == 2 and summary["model"].config.in_channels == 4
    with pytest.raises(FileNotFoundError, match="missing_vae"):
        train(parse(common[:-4] + ["--vae", str(tmp_path / "missing_vae"), "--data", "synthetic", "--steps", "1",
                                   "--batch-size", "1", "--output", str(tmp_path / "x")]))


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    # --compile wraps the model in torch.compile (aot_eager here: no C++ toolchain needed); the same ops in the same
    # order give the same losses as the eager run, and checkpoints hold the plain model's names
    _run(tmp_path, "eager", 2)
    _run(tmp_path, "compiled", 2, "--compile", "aot_eager")
    with open(tmp_path / "eager" / "loss.csv") as fa, open(tmp_path / "compiled" / "loss.csv") as fb:
        la, lb = fa.read().splitlines()[1:], fb.read().splitlines()[1:]
    assert len(la) == len(lb) == 2
    for a, b in zip(la, lb):
        assert [float(x) for x in a.split(",")] == pytest.approx([float(x) for x in b.split(",")], rel=1e-5)
    ckpt = load_file(os.path.join(tmp_path, "compiled", "checkpoints", "step_0000002", "model.safetensors"))
    assert not any("_orig_mod" in k for k in ckpt)


def test_step_gradients_float32_matches_float64():
    # the helper the GPU backend checks are built on: same step in float32 and float64, gradients of every parameter
    # and of x_t by name, agreeing to float32 rounding
    from matten.train import fixed_step_inputs, step_gradients

    torch.manual_seed(0)
    model = create_model("Matten-T/2", **TINY_MODEL, num_classes=4, learn_sigma=True).eval()
    x0, labels, t, noise = fixed_step_inputs(SyntheticShapesDataset(num_frames=2, size=4), 2, "cpu")
    loss32, g32 = step_gradients(model, x0, labels, t, noise)
    loss64, g64 = step_gradients(model.double(), x0, labels, t, noise)
    assert set(g32) == set(g64) == {n for n, _ in model.named_parameters()} | {"x_t"}
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in g64:
        err = ((g32[name] - g64[name]).norm() / g64[name].norm().clamp_min(1e-30)).item()
        assert err <= 1e-4, (name, err)


def test_learning_rate_warmup_and_resume(tmp_path):
    from matten.train import learning_rate

    assert [learning_rate(1e-3, s, 4) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate(1e-3, 0, 0) == 1e-3
    # the schedule is a function of the step: a run resumed inside the warm-up matches an uninterrupted one
    _run(tmp_path, "straight", 4, "--warmup-steps", "3")
    _run(tmp_path, "resumed", 2, "--warmup-steps", "3")
    _run(tmp_path, "resumed", 4, "--warmup-steps", "3", "--resume")
    a = load_file(os.path.join(tmp_path, "straight", "checkpoints", "step_0000004", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "resumed", "checkpoints", "step_0000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the schedule is applied: without it the weights differ
    _run(tmp_path, "constant", 4)
    c = load_file(os.path.join(tmp_path, "constant", "checkpoints", "step_0000004", "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="warmup-steps"):
        _run(tmp_path, "bad", 1, "--warmup-steps", "-1")


def test_adam_beta2_reaches_the_optimizer(tmp_path):
    _run(tmp_path, "beta", 2, "--adam-beta2", "0.95")
    step_dir = os.path.join(tmp_path, "beta", "checkpoints", "step_0000002")
    metas = [f for f in os.listdir(step_dir) if f.endswith(".json")]
    groups = [g for f in metas for g in json.load(open(os.path.join(step_dir, f))).get("optimizer", {})
              .get("param_groups", [])]
    assert groups and all(tuple(g["betas"]) == (0.9, 0.95) for g in groups), metas
    with pytest.raises(ValueError, match="adam-beta2"):
        _run(tmp_path, "bad", 1, "--adam-beta2", "1.0")


def test_largest_gradients_names_the_parameters():
    from matten.train import largest_gradients

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    assert largest_gradients(model) == "-"  # no gradients yet
    model(torch.randn(5, 3)).sum().backward()
    with torch.no_grad():
        model[1].bias.grad.fill_(1e6)
    text = largest_gradients(model, k=2)
    assert text.startswith("1.bias 1e+06 (rms") and text.count("(rms") == 2


def test_qk_norm_flag_builds_the_model_with_it(tmp_path):
    out = _run(tmp_path, "qk", 1, "--qk-norm")
    assert out["model"].matten_config.qk_norm is True
    assert any(name.endswith("attn.q_norm.weight") for name, _ in out["model"].named_parameters())
    assert _run(tmp_path, "plain", 1)["model"].matten_config.qk_norm is False


def test_cuda_graph_flag_says_what_it_needs(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs one CUDA process.*a CPU device"):
        _run(tmp_path, "graph", 1, "--cuda-graph")
    assert parse(TINY + ["--data", "synthetic", "--steps", "1", "--batch-size", "1", "--output", "x"]).cuda_graph is None


@pytest.mark.gpu
def test_cuda_graph_training_matches_eager_gpu(tmp_path):
    # the same run eagerly and with the step replayed as a CUDA graph (fp32, Triton kernels, no label dropout: the
    # graph's warm-up steps would shift the default generator's draws): the same losses step by step
    gpu = [a for a in TINY if a not in ("--device", "cpu", "--kernel-backend", "ref")]
    common = gpu + ["--device", "cuda", "--precision", "fp32", "--class-dropout-prob", "0", "--data", "synthetic",
                    "--class-conditional", "--steps", "3", "--batch-size", "2", "--log-every", "1",
                    "--synthetic-length", "6", "--checkpoint-every", "3"]
    train(parse(common + ["--output", str(tmp_path / "eager"), "--no-cuda-graph"]))
    train(parse(common + ["--output", str(tmp_path / "graph")]))  # on by default for one CUDA process
    # and the compiled model captured (aot_eager: the same ops, no Inductor code generation)
    train(parse(common + ["--output", str(tmp_path / "compiled"), "--compile", "aot_eager"]))
    with open(tmp_path / "eager" / "loss.csv") as fa:
        la = fa.read().splitlines()[1:]
    assert len(la) == 3
    for other in ("graph", "compiled"):
        with open(tmp_path / other / "loss.csv") as fb:
            lb = fb.read().splitlines()[1:]
        assert len(lb) == 3, other
        for a, b in zip(la, lb):
            assert [float(x) for x in a.split(",")] == pytest.approx([float(x) for x in b.split(",")], rel=1e-4), other
