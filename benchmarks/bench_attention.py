"""Video attention benchmark: matten's Triton kernels vs torch SDPA with the rearranges, fwd and fwd+bwd.

Shape (SPEC.md section 7 anchor): B=2, F=16, S=256, H=16, head_dim=72, bf16, q/k/v as views of a packed
(B, F*S, 3, H, hd) projection. Every provider starts from that packed tensor and ends with (B, F*S, H, hd), its
gradient the gradient of the packed tensor: SDPA needs einops rearranges to (sequences, H, L, hd) and back (their
copies are part of its cost, as in the model); ours (`matten`, what the model calls) is `video_attention_qkvpacked`,
which reads the packed layout through strides and writes the packed gradient; `matten-views` is
`video_attention(*qkv.unbind(2))`, whose backward autograd finishes with a stack of the three gradients.
flash-attn is not a provider: it is not a dependency of this project.

Timing: `triton.testing.do_bench` medians of eager calls (host time included whenever it exceeds the GPU's), and with
`--cudagraph` also `do_bench_cudagraph` (the same calls replayed from a CUDA graph: device time only, the regime of a
captured training step or torch.compile's "reduce-overhead"); every row says which.

Cost model (attention FLOPs counted explicitly, SPEC.md): forward 4 * L^2 * hd per head per sequence, backward 2.5x
that. Bytes floor: forward reads q, k, v and writes o (4 x B*N*H*hd*2 bytes); fwd+bwd adds reading q, k, v, o, dO
and writing dq, dk, dv (12 x in all). Floor = max(bytes / 3.0 TB/s, FLOPs / 693 TFLOP/s) (device copy rate and bf16
matmul rate measured on an H100, SPEC.md section 7).

Usage: PYTHONPATH=. python benchmarks/bench_attention.py [--check] [--cudagraph] [--variants] [--sweep-configs 3]
       [--providers matten,matten-views,sdpa] [--out DIR]
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
from triton.testing import do_bench, do_bench_cudagraph

from matten_kernels import video_attention, video_attention_qkvpacked, video_attention_ref
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
    return video_attention_qkvpacked(qkv, num_frames=F, axis=axis)


def matten_views_provider(qkv, F, axis):
    q, k, v = qkv.unbind(2)
    return video_attention(q, k, v, num_frames=F, axis=axis)


def attention_flops(B, F, S, H, D, axis):
    L, nseq = {"spatial": (S, F), "temporal": (F, S), "global": (F * S, 1)}[axis]
    return 4 * L * L * D * nseq * B * H


def time_provider(fn, qkv, cot, F, axis, mode, timing="eager"):
    """Median ms of one fwd or fwd+bwd call; ``timing`` "eager" (do_bench) or "cudagraph" (do_bench_cudagraph)."""
    if mode == "fwd":
        x = qkv.detach()

        def step():
            fn(x, F, axis)
    else:
        x = qkv.detach().requires_grad_()

        def step():
            out = fn(x, F, axis)
            torch.autograd.grad(out, x, cot)

    if timing == "cudagraph":
        step()  # compile and cache outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(step, rep=100, return_mode="median")
    return do_bench(step, warmup=25, rep=100, return_mode="median")


def kernel_breakdown(fn, qkv, cot, F, axis, iters=5):
    """Device time per kernel (us per fwd+bwd) from torch.profiler, and the eager wall time per iteration: when the
    kernels sum to much less than the wall time, the eager timing is bound by host-side launch overhead."""
    from torch.profiler import ProfilerActivity, profile

    x = qkv.detach().requires_grad_()

    def step():
        out = fn(x, F, axis)
        torch.autograd.grad(out, x, cot)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per_kernel = {}
    for evt in prof.key_averages():
        # self device time: kernels count once, the CPU-side ops that launched them count zero
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        if t > 0 and evt.key:
            per_kernel[evt.key[:48]] = t / iters
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8])


def host_cost(fn, qkv, cot, F, axis, iters=100, profile_calls=0):
    """Host (CPU) microseconds per call of fwd and of fwd+bwd: wall time of ``iters`` calls issued back to back with
    no synchronisation inside (the GPU runs behind), so the number is the Python + launch cost, not the kernels'.
    With ``profile_calls``, also cProfile's top functions (by own time) over that many fwd+bwd calls."""
    import cProfile
    import io
    import pstats
    import time

    x = qkv.detach().requires_grad_()

    def fwd():
        return fn(x, F, axis)

    def fwd_bwd():
        torch.autograd.grad(fn(x, F, axis), x, cot)

    out = {}
    for name, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        out[f"host_us_{name}"] = (time.perf_counter() - t0) / iters * 1e6
        torch.cuda.synchronize()
    if profile_calls:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(profile_calls):
            fwd_bwd()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["cprofile"] = buf.getvalue()
    return out


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


def sweep_configs(n, args):
    """Run configs 0..n-1 of every kernel (no autotuning) each in its own process (a crash or a wrong result at one
    tile shape then names the shape and spares the others); return one summary line per config and the indices
    that ran and passed every check (this process then runs the lowest passing index of each list)."""
    lines, passed = [], set()
    for i in range(n):
        cmd = [sys.executable, __file__, "--providers", "matten", "--check", "--tag", f"cfg{i}", "--out", args.out]
        env = dict(os.environ, MATTEN_ATTN_CONFIG=str(i))
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.sweep_timeout)
            out, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
            r = None
        if rc != 0:
            err = (r.stderr if r is not None else "").strip().splitlines()[-3:]
            lines.append(f"cfg{i}: FAILED rc={rc}: {' | '.join(err)}")
        elif "FAIL" not in out and out.count(" ok") >= len(AXES):
            passed.add(i)
        for line in out.splitlines():
            if line.startswith(("check", "spatial", "temporal", "global", "configs")):
                lines.append(f"cfg{i}: {line}")
        print("\n".join(l for l in lines if l.startswith(f"cfg{i}")), flush=True)
    return lines, passed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--spatial", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--variants", action="store_true", help="also time the padded (unsplit) head dim")
    ap.add_argument("--check", action="store_true", help="max error of the providers vs the fp32 reference")
    ap.add_argument("--providers", default="matten,matten-views,sdpa")
    ap.add_argument("--cudagraph", action="store_true",
                    help="also time every provider replayed from a CUDA graph (device time, no host overhead)")
    ap.add_argument("--sweep-configs", type=int, default=0, metavar="N",
                    help="first run config indices 0..N-1, each in a subprocess, then time the lowest that passed")
    ap.add_argument("--sweep-timeout", type=float, default=90)
    ap.add_argument("--profile", action="store_true", help="device time per kernel of one fwd+bwd (torch.profiler)")
    ap.add_argument("--host", action="store_true",
                    help="host (CPU) us per call of each provider, and a cProfile of ours (launch overhead)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU")
    sweep = []
    if args.sweep_configs:
        sweep, passed = sweep_configs(args.sweep_configs, args)
        triton_fwd.CONFIG_SUBSET = passed | set(range(args.sweep_configs, 99))
        sweep.append(f"config indices that passed: {sorted(passed)} (of 0..{args.sweep_configs - 1} swept); timing the "
                     "lowest")
        print(sweep[-1], flush=True)

    B, F, S, H, D = args.batch, args.frames, args.spatial, args.heads, args.head_dim
    dtype = torch.bfloat16
    torch.manual_seed(0)
    qkv = torch.randn(B, F * S, 3, H, D, device="cuda", dtype=dtype)
    cot = torch.randn(B, F * S, H, D, device="cuda", dtype=dtype)
    elem = B * F * S * H * D * qkv.element_size()
    all_providers = {"matten": matten_provider, "matten-views": matten_views_provider, "sdpa": sdpa_provider}
    providers = {name: all_providers[name] for name in args.providers.split(",")}
    if triton_fwd.FIXED_CONFIG is not None:
        i = triton_fwd.FIXED_CONFIG

        def pick(configs):
            return configs[min(i, len(configs) - 1)]

        print(f"configs {i}: fwd {pick(triton_fwd._fwd_configs(0))}; fwd packed {pick(triton_fwd._fwd_configs(16))}; "
              f"dkdv {pick(triton_bwd._dkdv_configs(0))}; dq {pick(triton_bwd._dq_configs(0))}; "
              f"bwd fused {pick(triton_bwd._fused_configs(0))}; bwd packed {pick(triton_bwd._packed_configs(16))}",
              flush=True)

    checks = []
    if args.check:
        sdpa_fn = sdpa_provider
        for axis in AXES:
            x = qkv.detach().float().requires_grad_()
            ref = video_attention_ref(*x.unbind(2), num_frames=F, axis=axis)
            (ref_grad,) = torch.autograd.grad(ref, x, cot.float())
            ref = ref.detach()
            base = max_errors(sdpa_fn, qkv, cot, F, axis, ref, ref_grad)
            for name, fn in providers.items():
                e_out, e_grad, ok = max_errors(fn, qkv, cot, F, axis, ref, ref_grad)
                rule = ok and e_out <= 2 * base[0] + 1e-3 and e_grad <= 2 * base[1] + 1e-3
                checks.append(dict(axis=axis, provider=name, max_err_out=e_out, max_err_grad=e_grad, finite=ok,
                                   sdpa_err_out=base[0], sdpa_err_grad=base[1], flash_rule=rule))
                print(f"check {axis:8s} {name:6s} max|err| out {e_out:.2e} grad {e_grad:.2e} (sdpa {base[0]:.2e} "
                      f"{base[1]:.2e}) {'ok' if rule else 'FAIL'}", flush=True)
            del x, ref, ref_grad

    # (name, SPLIT_HEAD_DIM); the first is the library default
    variants = [("split", True)] + ([("padded", False)] if args.variants else [])
    timings = ["eager"] + (["cudagraph"] if args.cudagraph else [])
    rows = []
    for axis in AXES:
        flops_fwd = attention_flops(B, F, S, H, D, axis)
        for mode in ("fwd", "fwd+bwd"):
            flops = flops_fwd * (1 if mode == "fwd" else 3.5)
            nbytes = elem * (4 if mode == "fwd" else 12)
            floor_ms = max(nbytes / COPY_BW, flops / MATMUL_RATE) * 1e3
            for timing in timings:
                for name, fn in providers.items():
                    for vname, split in variants if name == "matten" else [("-", None)]:
                        if split is not None:
                            triton_fwd.SPLIT_HEAD_DIM = split
                        ms = time_provider(fn, qkv, cot, F, axis, mode, timing)
                        rows.append(dict(axis=axis, mode=mode, provider=name, variant=vname, timing=timing, ms=ms,
                                         tflops=flops / ms * 1e-9, floor_ms=floor_ms, floor_frac=floor_ms / ms,
                                         flops=flops, bytes=nbytes,
                                         anchor_sdpa_ms=ANCHOR_SDPA_MS[axis][mode != "fwd"]))
                        print(f"{axis:8s} {mode:7s} {timing:9s} {name:12s} {vname:6s} {ms:8.3f} ms", flush=True)
                triton_fwd.SPLIT_HEAD_DIM = True

    breakdown = {}
    if args.profile:
        for axis in AXES:
            for name, fn in providers.items():
                try:
                    breakdown[f"{axis}/{name}"] = kernel_breakdown(fn, qkv, cot, F, axis)
                except Exception as e:  # profiling is diagnostic only; the timings above stand
                    breakdown[f"{axis}/{name}"] = {"error": str(e)[:200]}

    host = {}
    if args.host:
        for axis in AXES:
            for name, fn in providers.items():
                host[f"{axis}/{name}"] = host_cost(fn, qkv, cot, F, axis,
                                                   profile_calls=30 if name == "matten" and axis != "global" else 0)
                print(f"host {axis:8s} {name:6s} fwd {host[f'{axis}/{name}']['host_us_fwd']:7.1f} us  fwd+bwd "
                      f"{host[f'{axis}/{name}']['host_us_fwd+bwd']:7.1f} us", flush=True)
                if "cprofile" in host[f"{axis}/{name}"]:
                    print(host[f"{axis}/{name}"]["cprofile"], flush=True)

    meta = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shape=dict(batch=B, frames=F, spatial=S, heads=H, head_dim=D, dtype=str(dtype)),
        timing="eager: triton.testing.do_bench median, warmup 25 ms, rep 100 ms; cudagraph: do_bench_cudagraph median, "
               "rep 100 ms",
        fixed_config=triton_fwd.FIXED_CONFIG, tuned_configs=triton_fwd.tuned_configs(), sweep=sweep,
    )
    os.makedirs(args.out, exist_ok=True)
    gpu_tag = meta["gpu"].replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"attention-{gpu_tag}-{meta['date'][:10]}{'-' + args.tag if args.tag else ''}.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, results=rows, checks=checks, kernel_us_per_fwd_bwd=breakdown, host=host), fh, indent=2)
    if "sdpa" not in providers:
        return

    print(f"# {meta['gpu']} torch {meta['torch']} triton {meta['triton']} commit {meta['commit']} -> {path}")
    print(f"# B={B} F={F} S={S} H={H} hd={D} bf16, packed qkv; ms = median (eager: do_bench; cudagraph: "
          "do_bench_cudagraph)")
    for line in sweep:
        print(line)
    for key, kernels in breakdown.items():
        total = sum(v for v in kernels.values() if isinstance(v, float))
        print(f"kernels {key:17s} sum {total:7.1f} us: " + ", ".join(
            f"{k.split('(')[0][:28]} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in kernels.items()))
    for c in checks:
        print(f"check {c['axis']:8s} {c['provider']:6s} max|err| out {c['max_err_out']:.2e} grad {c['max_err_grad']:.2e}"
              f" (sdpa {c['sdpa_err_out']:.2e} {c['sdpa_err_grad']:.2e}) {'ok' if c['flash_rule'] else 'FAIL'}")
    print(f"{'axis':8s} {'mode':7s} {'timing':9s} {'provider':12s} {'variant':7s} {'ms':>8s} {'sdpa ms':>8s} "
          f"{'speedup':>7s} {'TFLOP/s':>7s} {'floor%':>6s} {'anchor':>6s}  target")
    for axis in AXES:
        for mode in ("fwd", "fwd+bwd"):
            for timing in timings:
                sdpa = next(r for r in rows if r["axis"] == axis and r["mode"] == mode and r["provider"] == "sdpa"
                            and r["timing"] == timing)
                for r in rows:
                    if (r["axis"] == axis and r["mode"] == mode and r["provider"] != "sdpa"
                            and r["timing"] == timing):
                        print(f"{axis:8s} {mode:7s} {timing:9s} {r['provider']:12s} {r['variant']:7s} {r['ms']:8.3f} "
                              f"{sdpa['ms']:8.3f} {sdpa['ms'] / r['ms']:6.2f}x {r['tflops']:7.1f} "
                              f"{100 * r['floor_frac']:5.1f}% {r['anchor_sdpa_ms']:6.2f}  "
                              f"{TARGET[axis] if mode != 'fwd' and r['provider'] == 'matten' else ''}")


if __name__ == "__main__":
    main()
