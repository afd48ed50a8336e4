"""Video attention benchmark: matten's Triton kernels vs torch SDPA with the rearranges, fwd and fwd+bwd.

Shape (SPEC.md section 7 anchor): B=2, F=16, S=256, H=16, head_dim=72, bf16, q/k/v as views of a packed
(B, F*S, 3, H, hd) projection. Both providers start from that packed tensor and end with (B, F*S, H, hd):
SDPA needs einops rearranges to (sequences, H, L, hd) and back (their copies are part of its cost, as in the model);
ours reads the packed layout through strides. flash-attn is not a provider: it is not a dependency of this project.

Cost model (attention FLOPs counted explicitly, SPEC.md): forward 4 * L^2 * hd per head per sequence, backward 2.5x
that. Bytes floor: forward reads q, k, v and writes o (4 x B*N*H*hd*2 bytes); fwd+bwd adds reading q, k, v, o, dO
and writing dq, dk, dv (12 x in all). Floor = max(bytes / 3.0 TB/s, FLOPs / 693 TFLOP/s) (device copy rate and bf16
matmul rate measured on an H100, SPEC.md section 7).

Usage: PYTHONPATH=. python benchmarks/bench_attention.py [--variants] [--check] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as Fn
import triton
from einops import rearrange
from triton.testing import do_bench

from matten_kernels import video_attention, video_attention_ref
from matten_kernels.attention import triton_bwd, triton_fwd

COPY_BW = 3.0e12  # bytes/s, H100 device-to-device copy (SPEC.md section 7)
MATMUL_RATE = 693e12  # FLOP/s, H100 bf16 matmul (SPEC.md section 7)
AXES = ("spatial", "temporal", "global")
ANCHOR_SDPA_MS = {  # H100 anchors (SPEC.md section 7): (fwd, fwd+bwd)
    "spatial": (0.053, 0.43), "temporal": (0.30, 0.83), "global": (0.44, 1.89)
}
TARGET = {"spatial": "fwd+bwd >= 1.2x SDPA", "temporal": "fwd+bwd >= 3x SDPA", "global": "fwd+bwd within 1.1x SDPA"}

SDPA_PATTERN = {
    "spatial": ("b (f s) t h d -> t (b f) h s d", "(b f) h s d -> b (f s) h d"),
    "temporal": ("b (f s) t h d -> t (b s) h f d", "(b s) h f d -> b (f s) h d"),
    "global": ("b n t h d -> t b h n d", "b h n d -> b n h d"),
}


def sdpa_provider(qkv, F, axis):
    B, N = qkv.shape[:2]
    into, back = SDPA_PATTERN[axis]
    q, k, v = rearrange(qkv, into, f=F, s=N // F) if axis != "global" else rearrange(qkv, into)
    o = Fn.scaled_dot_product_attention(q, k, v)
    return rearrange(o, back, b=B, f=F) if axis != "global" else rearrange(o, back).contiguous()


def matten_provider(qkv, F, axis):
    q, k, v = qkv.unbind(2)
    return video_attention(q, k, v, num_frames=F, axis=axis)


def attention_flops(B, F, S, H, D, axis):
    L, nseq = {"spatial": (S, F), "temporal": (F, S), "global": (F * S, 1)}[axis]
    return 4 * L * L * D * nseq * B * H


def time_provider(fn, qkv, cot, F, axis, mode):
    if mode == "fwd":
        x = qkv.detach()
        return do_bench(lambda: fn(x, F, axis), warmup=25, rep=100, return_mode="median")
    x = qkv.detach().requires_grad_()

    def step():
        out = fn(x, F, axis)
        torch.autograd.grad(out, x, cot)

    return do_bench(step, warmup=25, rep=100, return_mode="median")


def max_errors(fn, qkv, cot, F, axis, ref_out, ref_grad):
    x = qkv.detach().requires_grad_()
    out = fn(x, F, axis)
    (grad,) = torch.autograd.grad(out, x, cot)
    e_out = (out.float() - ref_out).abs().max().item()
    e_grad = (grad.float() - ref_grad).abs().max().item()
    ok = bool(torch.isfinite(out).all() and torch.isfinite(grad).all())
    return e_out, e_grad, ok


def git_commit():
    commit = os.environ.get("MATTEN_COMMIT")
    if commit:
        return commit
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "matten_kernels/attention"], capture_output=True,
                               text=True).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--spatial", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--variants", action="store_true",
                    help="also time the padded (unsplit) head dim and the atomic-dQ backward")
    ap.add_argument("--check", action="store_true", help="max error of both providers vs fp32 reference")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU")

    B, F, S, H, D = args.batch, args.frames, args.spatial, args.heads, args.head_dim
    dtype = torch.bfloat16
    torch.manual_seed(0)
    qkv = torch.randn(B, F * S, 3, H, D, device="cuda", dtype=dtype)
    cot = torch.randn(B, F * S, H, D, device="cuda", dtype=dtype)
    elem = B * F * S * H * D * qkv.element_size()

    providers = {"matten": matten_provider, "sdpa": sdpa_provider}
    # (name, SPLIT_HEAD_DIM, ATOMIC_DQ); the first is the library default
    variants = [("split", True, False)] + ([("padded", False, False), ("atomic", True, True)] if args.variants else [])
    rows = []
    for axis in AXES:
        flops_fwd = attention_flops(B, F, S, H, D, axis)
        for mode in ("fwd", "fwd+bwd"):
            flops = flops_fwd * (1 if mode == "fwd" else 3.5)
            nbytes = elem * (4 if mode == "fwd" else 12)
            floor_ms = max(nbytes / COPY_BW, flops / MATMUL_RATE) * 1e3
            for name, fn in providers.items():
                for vname, split, atomic in variants if name == "matten" else [("-", None, None)]:
                    if atomic and (mode == "fwd" or axis == "temporal"):
                        continue  # atomic dQ only changes the looping-mode backward
                    if split is not None:
                        triton_fwd.SPLIT_HEAD_DIM, triton_bwd.ATOMIC_DQ = split, atomic
                    ms = time_provider(fn, qkv, cot, F, axis, mode)
                    rows.append(dict(axis=axis, mode=mode, provider=name, variant=vname, ms=ms,
                                     tflops=flops / ms * 1e-9, floor_ms=floor_ms, floor_frac=floor_ms / ms,
                                     flops=flops, bytes=nbytes, anchor_sdpa_ms=ANCHOR_SDPA_MS[axis][mode != "fwd"]))
            triton_fwd.SPLIT_HEAD_DIM, triton_bwd.ATOMIC_DQ = True, False

    checks = []
    if args.check:
        for axis in AXES:
            x = qkv.detach().float().requires_grad_()
            ref = video_attention_ref(*x.unbind(2), num_frames=F, axis=axis)
            (ref_grad,) = torch.autograd.grad(ref, x, cot.float())
            ref = ref.detach()
            for name, fn in providers.items():
                e_out, e_grad, ok = max_errors(fn, qkv, cot, F, axis, ref, ref_grad)
                checks.append(dict(axis=axis, provider=name, max_err_out=e_out, max_err_grad=e_grad, finite=ok))
            del x, ref, ref_grad

    meta = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shape=dict(batch=B, frames=F, spatial=S, heads=H, head_dim=D, dtype=str(dtype)),
        timing="triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        tuned_configs=triton_fwd.tuned_configs(),
    )
    os.makedirs(args.out, exist_ok=True)
    gpu_tag = meta["gpu"].replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"attention-{gpu_tag}-{meta['date'][:10]}.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, results=rows, checks=checks), fh, indent=2)

    print(f"# {meta['gpu']} torch {meta['torch']} triton {meta['triton']} commit {meta['commit']} -> {path}")
    print(f"# B={B} F={F} S={S} H={H} hd={D} bf16, packed qkv; ms = do_bench median")
    for c in checks:
        print(f"check {c['axis']:8s} {c['provider']:6s} max|err| out {c['max_err_out']:.2e} grad {c['max_err_grad']:.2e}"
              f" finite={c['finite']}")
    print(f"{'axis':8s} {'mode':7s} {'variant':7s} {'ours ms':>8s} {'sdpa ms':>8s} {'speedup':>7s} {'TFLOP/s':>7s} "
          f"{'floor%':>6s} {'anchor':>6s}  target")
    for axis in AXES:
        for mode in ("fwd", "fwd+bwd"):
            sdpa = next(r for r in rows if r["axis"] == axis and r["mode"] == mode and r["provider"] == "sdpa")
            for r in rows:
                if r["axis"] == axis and r["mode"] == mode and r["provider"] == "matten":
                    print(f"{axis:8s} {mode:7s} {r['variant']:7s} {r['ms']:8.3f} {sdpa['ms']:8.3f} "
                          f"{sdpa['ms'] / r['ms']:6.2f}x {r['tflops']:7.1f} {100 * r['floor_frac']:5.1f}% "
                          f"{r['anchor_sdpa_ms']:6.2f}  {TARGET[axis] if mode != 'fwd' else ''}")


if __name__ == "__main__":
    main()
