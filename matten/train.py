"""``python -m matten train``: train a Matten model on a video folder, pre-encoded latents or the synthetic dataset.

Recipe (SPEC.md section 5): AdamW (lr 1e-4, weight decay 0), EMA, gradient clipping, bf16 autocast on CUDA,
1000-step linear schedule, eps prediction with learned-range variance, loss L_simple + L_vlb.

Multi-GPU: ``torchrun --nproc_per_node=N -m matten train ...`` (DDP; each process takes ``--batch-size`` clips;
``DistributedSampler`` splits the data; rank 0 writes checkpoints). Without CUDA the processes use gloo on the CPU.

Checkpoints (``OUTPUT/checkpoints/step_NNNNNNN/``) hold only safetensors and JSON, no pickled code: ``model``,
``ema`` and ``optimizer`` tensors, every rank's RNG states (``rng_rankR.safetensors``) and ``state.json`` (step,
optimizer hyper-parameters, configuration). ``--resume`` continues from the newest one, so that the resumed run
computes exactly what an uninterrupted run would: data order and augmentation are functions of (seed, epoch,
index), and the noise/timestep generator and the global RNGs (label dropout) are restored. The EMA weights are also
exported with ``save_pretrained`` to ``OUTPUT/ema`` (what ``python -m matten sample --checkpoint OUTPUT`` reads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .data import LATENT_INDEX, LatentDataset, SyntheticShapesDataset, VideoFolderDataset
from .diffusion import GaussianDiffusion, diffusion_loss
from .ema import EMA

logger = logging.getLogger("matten.train")

CHECKPOINTS = "checkpoints"
LATEST = "latest"


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True,
                   help="'synthetic' (moving shapes made on the fly), a video folder (class sub-folders, UCF101 "
                        "layout), or a folder of latents written by --encode-latents")
    d.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the preset's)")
    d.add_argument("--frame-interval", type=int, default=3, help="take every k-th frame of a video (default 3)")
    d.add_argument("--image-size", type=int, default=None,
                   help="training resolution in pixels (default: the preset's sample_size x the VAE factor)")
    d.add_argument("--num-classes", type=int, default=4, help="synthetic: number of shape kinds (1..4)")
    d.add_argument("--synthetic-length", type=int, default=100_000, help="synthetic: nominal epoch length")
    d.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flips")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    d.add_argument("--class-conditional", action="store_true",
                   help="condition on the class labels (sub-folder names / shape kinds); enables CFG at sampling")
    v = parser.add_argument_group("autoencoder")
    v.add_argument("--vae", default="none",
                   help="local AutoencoderKL folder (SD v1-4 'vae' folder) or 'none' for pixel space (default)")
    v.add_argument("--vae-chunk-size", type=int, default=16, help="frames per VAE call")
    v.add_argument("--encode-latents", metavar="DIR", default=None,
                   help="encode --data with --vae into DIR (safetensors per clip) and exit; train later with --data DIR")
    m = parser.add_argument_group("model")
    m.add_argument("--preset", default="Matten-T/2", help="a name of matten.MATTEN_CONFIGS (default Matten-T/2)")
    for name, typ in (("depth", int), ("hidden-size", int), ("num-heads", int), ("patch-size", int),
                      ("class-dropout-prob", float)):
        m.add_argument(f"--{name}", type=typ, default=None, help="override the preset's value")
    m.add_argument("--variant", default=None, help="override: 1, 2, 3, 4 or latte")
    m.add_argument("--condition", default=None, choices=["adan", "tokens"], help="override the conditioning")
    m.add_argument("--qk-norm", action="store_true", default=None,
                   help="RMS-normalise q and k per head in the attention blocks (not in the paper; bounds the logits)")
    m.add_argument("--kernel-backend", default=None, choices=["auto", "triton", "cuda", "ref"],
                   help="override the kernel backend")
    m.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (default backend inductor; the custom kernels stay opaque ops). "
                        "The demo model's step on an H100: 55 -> 39 ms")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    m.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step's forward + backward as a captured CUDA graph: no host launch cost per "
                        "kernel (optimizer, clipping and EMA stay eager; with --compile, the compiled model's kernels). "
                        "Default: on for one CUDA process without --gradient-checkpointing, which it cannot be "
                        "combined with")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, required=True, help="total optimizer steps (a resumed run counts from 0)")
    o.add_argument("--batch-size", type=int, required=True, help="clips per process per step")
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warm-up over the first N steps (0: constant lr, the paper's recipe)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--adam-beta2", type=float, default=0.999,
                   help="AdamW's second-moment decay (default 0.999, the paper's; lower values such as 0.99 bound the "
                        "step a sudden gradient spike can cause, since the second moment catches up faster)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    o.add_argument("--ema-decay", type=float, default=0.9999)
    o.add_argument("--ema-warmup-steps", type=int, default=0, help="use --ema-warmup-decay for the first N steps")
    o.add_argument("--ema-warmup-decay", type=float, default=0.99)
    o.add_argument("--ema-schedule", choices=["constant", "paper"], default="constant",
                   help="'paper': decay 0.99 for the first 50k steps, then 0.9999 (overrides the --ema-* values)")
    o.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    r = parser.add_argument_group("run")
    r.add_argument("--output", required=True, help="output folder (checkpoints, logs, ema/)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    r.add_argument("--init-from", metavar="PATH", default=None,
                   help="start from these weights (anything --checkpoint of the sample command takes, e.g. the "
                        "embedded demo's .safetensors); optimizer and EMA start fresh. The configuration must match")
    r.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept on disk (newest)")
    r.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    r.add_argument("--max-time", type=float, default=None,
                   help="stop (checkpoint and export) after this many seconds of training")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    r.add_argument("--export-demo", metavar="STEM", default=None,
                   help="also write the EMA weights as STEM.safetensors (float16) + STEM.json (the embedded-demo format)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    summary = train(args)
    if summary.get("rank", 0) == 0 and summary.get("final_loss") is not None:
        print(f"trained {summary['step']} steps; final loss {summary['final_loss']:.4f}; output {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------------


class Dist:
    """Rank, world size and device of this process (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""

    def __init__(self, device_arg: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg}: CUDA is not available on this machine")
        if want_cuda:
            index = self.local_rank if self.world > 1 or device_arg in ("auto", "cuda") else torch.device(device_arg).index
            self.device = torch.device("cuda", index or 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.initialised_here = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.initialised_here = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self):
        if self.initialised_here:
            dist.destroy_process_group()


def build_dataset(args, vae_factor: int | None, preset_frames: int, preset_size: int):
    """-> (dataset, data space description dict)."""
    if args.data == "synthetic":
        size = args.image_size or preset_size * (vae_factor or 1)
        ds = SyntheticShapesDataset(num_frames=args.num_frames or preset_frames, size=size,
                                    num_classes=args.num_classes, length=args.synthetic_length, seed=args.seed)
        return ds, {"kind": "synthetic", "image_size": size}
    if os.path.isfile(os.path.join(args.data, LATENT_INDEX)):
        ds = LatentDataset(args.data, seed=args.seed)
        return ds, {"kind": "latents", "image_size": ds.meta["size"], "latent_shape": ds.meta["latent_shape"]}
    size = args.image_size or preset_size * (vae_factor or 1)
    ds = VideoFolderDataset(args.data, num_frames=args.num_frames or preset_frames, frame_interval=args.frame_interval,
                            size=size, hflip=args.hflip, seed=args.seed, probe_workers=max(1, args.num_workers or 4))
    return ds, {"kind": "videos", "image_size": size}


def model_overrides(args, dataset, vae, data_info) -> dict:
    """MattenConfig fields set by the data (channels, frames, size, classes) and by the CLI overrides."""
    if data_info["kind"] == "latents":
        channels, frames, size, _ = data_info["latent_shape"]
    else:
        channels = vae.latent_channels if vae is not None else 3
        frames = dataset.num_frames
        size = data_info["image_size"] // (vae.downsample_factor if vae is not None else 1)
    o = {"in_channels": channels, "num_frames": frames, "sample_size": size,
         "num_classes": dataset.num_classes if args.class_conditional else 0, "learn_sigma": True}
    for name in ("depth", "hidden_size", "num_heads", "patch_size", "class_dropout_prob", "condition", "kernel_backend",
                 "qk_norm"):
        if getattr(args, name) is not None:
            o[name] = getattr(args, name)
    if args.variant is not None:
        o["variant"] = args.variant if args.variant == "latte" else int(args.variant)
    return o


def learning_rate(base: float, step: int, warmup_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): linear warm-up to ``base`` over ``warmup_steps``, then constant."""
    return base * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base


def autocast_context(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------------------


def training_step(model, diffusion: GaussianDiffusion, x0: torch.Tensor, labels: torch.Tensor | None,
                  generator: torch.Generator, autocast=None, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Forward of one batch: draw t and noise (unless given), noise x0, predict, per-sample losses (fp32)."""
    b = x0.shape[0]
    if t is None:
        t = diffusion.sample_timesteps(b, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    x_t = diffusion.q_sample(x0, t, noise)
    with autocast or contextlib.nullcontext():
        out = model(x_t, t, class_labels=labels).sample  # (B, 2C, F, H, W)
    return diffusion_loss(diffusion, out, x0, x_t, t, noise, learn_sigma=True)


def fixed_step_inputs(dataset, batch_size: int, device, seed: int = 0):
    """(x0, labels, t, noise): the first ``batch_size`` items of ``dataset`` with timesteps and noise drawn from
    ``seed``: a reproducible step for :func:`step_gradients`."""
    items = [dataset[i] for i in range(batch_size)]
    x0 = torch.stack([b["video"] for b in items]).to(device).float()
    labels = torch.stack([torch.as_tensor(b["label"]) for b in items]).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.randint(0, GaussianDiffusion().num_timesteps, (batch_size,), device=device, generator=g)
    noise = torch.randn(x0.shape, device=device, generator=g)
    return x0, labels, t, noise


def largest_gradients(model: torch.nn.Module, k: int = 3) -> str:
    """The ``k`` parameters with the largest gradient norms, as "name |grad| (weight rms)" (one host sync); logged
    with the loss so that a diverging run names the parameters that blow up first."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return "-"
    norms = torch.stack([p.grad.detach().float().norm() for _, p in named])
    top = torch.topk(norms, min(k, len(named))).indices.tolist()
    rms = torch.stack([named[i][1].detach().float().pow(2).mean().sqrt() for i in top]).tolist()
    return ", ".join(f"{named[i][0]} {norms[i].item():.3g} (rms {r:.3g})" for i, r in zip(top, rms))


def step_gradients(model, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor,
                   autocast=None) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean loss and float64 gradients of one training step with fixed ``t`` and ``noise``, for comparing kernel
    backends and precisions: every parameter by name (a torch.compile wrapper's prefix removed) and ``"x_t"``, the
    noisy input. The model's dtype sets the input's (x_t is formed in float64, then cast)."""
    diffusion = GaussianDiffusion()
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    x_t = diffusion.q_sample(x0.double(), t, noise.double()).to(dtype).requires_grad_()
    with autocast or contextlib.nullcontext():
        out = model(x_t, t, class_labels=labels).sample
    loss = diffusion_loss(diffusion, out.to(dtype), x0.to(dtype), x_t, t, noise.to(dtype), learn_sigma=True)["loss"]
    loss.mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.double().clone() for n, p in model.named_parameters()}
    grads["x_t"] = x_t.grad.double()
    return loss.mean().item(), grads


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON only
# ----------------------------------------------------------------------------------------------------------------------


def _optimizer_to_tensors(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict, device) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v if k == "step" else v.to(device)
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    t = {"torch_cpu": torch.get_rng_state(), "noise_generator": generator.get_state().cpu()}
    if device.type == "cuda":
        t["torch_cuda"] = torch.cuda.get_rng_state(device)
    return t


def _restore_rng(tensors: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["noise_generator"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)


def latest_checkpoint(output: str) -> str | None:
    path = os.path.join(output, CHECKPOINTS, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        name = fh.read().strip()
    full = os.path.join(output, CHECKPOINTS, name)
    return full if os.path.isdir(full) else None


def save_checkpoint(output: str, step: int, model, ema: EMA, opt, generator, dist_info: Dist, extra: dict,
                    keep: int) -> str:
    """Every rank writes its RNG states; rank 0 writes weights, optimizer and state.json, then moves ``latest``."""
    from safetensors.torch import save_file

    root = os.path.join(output, CHECKPOINTS)
    name = f"step_{step:07d}"
    path = os.path.join(root, name)
    if dist_info.main:
        os.makedirs(path, exist_ok=True)
    dist_info.barrier()
    save_file(_rng_tensors(generator, dist_info.device), os.path.join(path, f"rng_rank{dist_info.rank}.safetensors"))
    if dist_info.main:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(path, "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  os.path.join(path, "ema.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_tensors(opt)
        save_file(opt_tensors, os.path.join(path, "optimizer.safetensors"))
        with open(os.path.join(path, "state.json"), "w") as fh:
            json.dump(dict(extra, step=step, world_size=dist_info.world, optimizer=opt_meta), fh, indent=1)
    dist_info.barrier()  # every rank's RNG file is on disk before `latest` points here
    if dist_info.main:
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(name)
        os.replace(tmp, os.path.join(root, LATEST))  # atomic: `latest` names only complete checkpoints
        old = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != name)
        for d in old[: max(0, len(old) - max(keep, 1) + 1)]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        logger.info("checkpoint %s", path)
    return path


def load_checkpoint_into(path: str, model, ema: EMA, opt, generator, dist_info: Dist) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    if state["world_size"] != dist_info.world:
        raise ValueError(f"--resume: checkpoint {path} was written by {state['world_size']} processes, this run has "
                         f"{dist_info.world}; a bit-exact continuation needs the same number")
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(dist_info.device)))
    ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors"), device=str(dist_info.device)))
    _optimizer_from_tensors(opt, load_file(os.path.join(path, "optimizer.safetensors")), state["optimizer"],
                            dist_info.device)
    _restore_rng(load_file(os.path.join(path, f"rng_rank{dist_info.rank}.safetensors")), generator, dist_info.device)
    return state


def export_demo(model, stem: str, sampling: dict, training: dict) -> None:
    """Write ``model`` as ``stem.safetensors`` (float16, to stay small) + ``stem.json`` (config, sampling defaults,
    how it was trained): the format of the embedded demo and of ``load_checkpoint`` for a .safetensors file."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    save_file({k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()},
              stem + ".safetensors")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    with open(stem + ".json", "w") as fh:
        json.dump({"model_config": config, "sampling": sampling, "training": training}, fh, indent=1)


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by the CLI arguments; returns a summary dict (rank, step, final_loss, ...)."""
    from . import create_model
    from .config import get_config
    from .vae import load_vae

    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0.0 <= args.adam_beta2 < 1.0:
        raise ValueError(f"--adam-beta2 must be in [0, 1), got {args.adam_beta2}")
    if args.steps < 0 or args.batch_size < 1:
        raise ValueError(f"--steps must be >= 0 and --batch-size >= 1, got {args.steps}, {args.batch_size}")
    d = Dist(args.device)
    try:
        preset = get_config(args.preset)
        vae = load_vae(args.vae, device=d.device)
        dataset, data_info = build_dataset(args, vae.downsample_factor if vae else None, preset.num_frames,
                                           preset.sample_size)
        if args.encode_latents:
            if vae is None or data_info["kind"] != "videos":
                raise ValueError("--encode-latents needs a video folder as --data and a --vae PATH")
            if d.main:
                from .data import encode_dataset

                n = encode_dataset(dataset, vae, args.encode_latents, batch_size=args.batch_size, device=d.device,
                                   chunk_size=args.vae_chunk_size, num_workers=args.num_workers)
                logger.info("wrote %d latent clips to %s", n, args.encode_latents)
            return {"rank": d.rank, "step": 0, "final_loss": None}
        if data_info["kind"] == "latents":
            vae_for_sampling = dataset.meta.get("vae")
            vae = None  # latents are read from disk
        else:
            vae_for_sampling = None if vae is None else os.path.abspath(args.vae)
        return _train_loop(args, d, dataset, data_info, vae, vae_for_sampling, create_model)
    finally:
        d.close()


def _train_loop(args, d: Dist, dataset, data_info, vae, vae_for_sampling, create_model) -> dict:
    from safetensors.torch import save_file  # noqa: F401 - fail before training when missing
    from tqdm.auto import tqdm

    device = d.device
    overrides = model_overrides(args, dataset, vae, data_info)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = create_model(args.preset, **overrides).to(device)
    init_meta = {}
    if args.init_from:
        from .pipeline import load_checkpoint

        source, init_meta = load_checkpoint(args.init_from, "cpu")
        ignore = {"kernel_backend"}
        mine = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k not in ignore}
        theirs = {k: v for k, v in dict(source.config).items() if not k.startswith("_") and k not in ignore}
        if json.loads(json.dumps(mine)) != json.loads(json.dumps(theirs)):
            diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
            raise ValueError(f"--init-from {args.init_from}: configuration differs (theirs, ours): {diff}")
        model.load_state_dict(source.state_dict())
        del source
    torch.manual_seed(args.seed * 1000 + d.rank)  # per-rank stream for label dropout
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if args.ema_schedule == "paper":
        ema = EMA.paper(model)
    else:
        ema = EMA(model, decay=args.ema_decay, warmup_steps=args.ema_warmup_steps, warmup_decay=args.ema_warmup_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, args.adam_beta2),
                            fused=device.type == "cuda")
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed * 1000 + d.rank)  # timesteps and noise, per rank
    diffusion = GaussianDiffusion().to(device)

    run_config = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "model_config": dict(model.config),
                  "data": data_info, "class_names": dataset.class_names, "vae": vae_for_sampling}
    start_step = 0
    if args.resume:
        ckpt = latest_checkpoint(args.output)
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", args.output)
        else:
            state = load_checkpoint_into(ckpt, model, ema, opt, generator, d)
            if state["model_config"] != json.loads(json.dumps(dict(model.config))):
                raise ValueError(f"--resume: checkpoint {ckpt} has a different model configuration")
            start_step = state["step"]
            logger.info("resumed from %s (step %d)", ckpt, start_step)
    if d.main:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "train_config.json"), "w") as fh:
            json.dump(run_config, fh, indent=1, default=str)

    ddp_model = model
    if d.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                              else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model, backend=args.compile)
    autocast = autocast_context(device, args.precision)
    graph_step = None
    clash = {"a CPU device": device.type != "cuda", f"{d.world} processes (DDP)": d.world > 1,
             "--gradient-checkpointing": args.gradient_checkpointing}
    clash = [k for k, v in clash.items() if v]
    if args.cuda_graph and clash:
        raise ValueError(f"--cuda-graph needs one CUDA process without --gradient-checkpointing; got {', '.join(clash)}")
    if args.cuda_graph is None and d.main:
        logger.info("training step as a CUDA graph: %s", "off (" + ", ".join(clash) + ")" if clash else "on")
    if args.cuda_graph or (args.cuda_graph is None and not clash):
        from .cuda_graph import CUDAGraphTrainStep

        # the autocast is made inside the step, where it inherits the capture's cache-off setting; with --compile the
        # compiled model is what is captured (its compilation happens in the warm-up steps)
        graph_step = CUDAGraphTrainStep(model.parameters(), lambda x0, labels, t, noise: training_step(
            ddp_model, diffusion, x0, labels, None, autocast_context(device, args.precision), t=t, noise=noise))
    cond = args.class_conditional

    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset ({len(dataset)} clips over {d.world} processes) is smaller than one batch "
                         f"of {args.batch_size}")
    if d.main:
        logger.info("model %s %s: %.2fM parameters; data %s (%d clips, %d classes); %d process(es) x batch %d on %s",
                    args.preset, overrides, n_params / 1e6, data_info["kind"], len(dataset), dataset.num_classes,
                    d.world, args.batch_size, device)

    log_path = os.path.join(args.output, "loss.csv")
    if d.main and not (args.resume and os.path.isfile(log_path)):
        with open(log_path, "w") as fh:
            fh.write("step,loss,mse,vb,grad_norm\n")
    pbar = tqdm(total=args.steps, initial=start_step, disable=not (d.main and args.progress), mininterval=5.0,
                desc="train", dynamic_ncols=True)
    # per-step (loss, mse, vb, gradient norm before clipping) on the device; flushed at log time (no sync per step)
    pending: list[torch.Tensor] = []
    step, t_start, t_log, step_log, last_loss = start_step, time.time(), time.time(), start_step, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    largest = ""  # the parameters with the largest gradients at the last log step (divergence diagnostics)

    def flush_log():
        nonlocal pending, t_log, step_log, last_loss
        if not pending:
            return
        values = d.mean(torch.stack(pending)).cpu()  # (n, 4), averaged over ranks
        first = step - len(pending) + 1
        if d.main:
            with open(log_path, "a") as fh:
                for i, (l, m, v, g) in enumerate(values.tolist()):
                    fh.write(f"{first + i},{l:.6f},{m:.6f},{v:.6f},{g:.6f}\n")
        elapsed = time.time() - t_log
        mean = values.mean(0).tolist()
        last_loss = values[-1, 0].item()
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        if d.main:
            msg = (f"step {step}/{args.steps} loss {mean[0]:.4f} (mse {mean[1]:.4f} vb {mean[2]:.4f}) grad norm "
                   f"{mean[3]:.3f} max {values[:, 3].max().item():.3f}; "
                   f"{(step - step_log) / max(elapsed, 1e-9):.2f} it/s peak mem {mem:.2f} GiB; largest gradients "
                   f"{largest}")
            logger.info(msg)
        pending, t_log, step_log = [], time.time(), step

    stop = step >= args.steps
    epoch = step // steps_per_epoch
    while not stop:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        indices = list(sampler)
        batches = [indices[i * args.batch_size:(i + 1) * args.batch_size] for i in range(steps_per_epoch)]
        skip = step - epoch * steps_per_epoch  # batches of this epoch already trained on (resume)
        # own generator: creating an iterator draws a worker base seed, which must not consume the global RNG
        loader_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * 101 + d.rank)
        loader = DataLoader(dataset, batch_sampler=batches[skip:], num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", generator=loader_rng)
        for batch in loader:
            x0 = batch["video"].to(device, non_blocking=True).float()
            labels = batch["label"].to(device, non_blocking=True) if cond else None
            if vae is not None:
                with torch.no_grad():
                    x0 = vae.encode(x0, chunk_size=args.vae_chunk_size, generator=generator)
            if graph_step is None:
                losses = training_step(ddp_model, diffusion, x0, labels, generator, autocast)
                loss = losses["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:  # the same draws as training_step's, then forward + backward replayed (sets every .grad)
                t = diffusion.sample_timesteps(x0.shape[0], generator=generator, device=device)
                noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
                losses = graph_step(x0, labels, t, noise)
                loss = losses["loss"].mean()
            if d.main and ((step + 1) % args.log_every == 0):
                largest = largest_gradients(model)
            # the norm is logged (divergence diagnostics); with no clipping the factor is exactly 1
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       args.grad_clip if args.grad_clip > 0 else float("inf"))
            for group in opt.param_groups:  # a function of the step alone, so --resume reproduces it
                group["lr"] = learning_rate(args.lr, step, args.warmup_steps)
            opt.step()
            ema.update(model, step)
            step += 1
            pending.append(torch.stack([loss.detach(), losses["mse"].mean().detach(), losses["vb"].mean().detach(),
                                        grad_norm.detach().to(loss.dtype)]))
            pbar.update(1)
            timed_out = args.max_time is not None and time.time() - t_start > args.max_time
            stop = step >= args.steps or d.any(timed_out)
            if step % args.log_every == 0 or stop:
                flush_log()
            if step % args.checkpoint_every == 0 or stop:
                save_checkpoint(args.output, step, model, ema, opt, generator, d,
                                {"model_config": dict(model.config), "epoch": epoch}, args.keep_checkpoints)
            if stop:
                if timed_out and step < args.steps:
                    logger.info("--max-time %.0f s reached at step %d", args.max_time, step)
                break
        epoch += 1
    pbar.close()
    train_seconds = time.time() - t_start

    sampling = {"vae": vae_for_sampling, "class_names": dataset.class_names if cond else None,
                "scheduler": "ddim", "steps": 50, "clip_sample": vae_for_sampling is None, "fps": 8}
    if d.main:
        ema_dir = os.path.join(args.output, "ema")
        ema.model.save_pretrained(ema_dir, safe_serialization=True)
        with open(os.path.join(ema_dir, "matten_sampling.json"), "w") as fh:
            json.dump(sampling, fh, indent=1)
        if args.export_demo:
            training = {"command": "python -m matten " + " ".join(sys.argv[1:]), "steps": step,
                        "processes": d.world, "batch_size_per_process": args.batch_size,
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "train_seconds": round(train_seconds, 1), "final_loss": last_loss,
                        "parameters": n_params, "ema_decay": ema.decay_at(max(step - 1, 0))}
            if args.init_from:
                training["init_from"] = args.init_from
                if "training" in init_meta:
                    training["continued_from"] = init_meta["training"]
            export_demo(ema.model, args.export_demo, sampling, training)
        logger.info("done: %d steps in %.1f s; EMA exported to %s", step, train_seconds, ema_dir)
    return {"rank": d.rank, "step": step, "final_loss": last_loss, "model": model, "ema": ema.model,
            "train_seconds": train_seconds, "parameters": n_params}
