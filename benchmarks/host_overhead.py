"""Host (Python) time per eager call of each Triton op, with the kernel launches stubbed out (runs on a CPU).

Short-sequence attention and small scans are bound by host time on the GPU machine (NOTES_attention.md), so this is
tracked without a GPU: the ops run under TRITON_INTERPRET=1 on CPU tensors with ``_launch.launch`` replaced by a
no-op, so what is timed is validation, dispatch, autograd, allocations and the launchers' own Python. Each op is
timed through its eager autograd.Function (the default) and through its torch.library custom op (what torch.compile
and dispatch modes use), fwd+bwd, as the minimum and median over rounds of back-to-back calls.

Usage: TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--rounds 9] [--calls 30] [--out FILE.json]
Absolute numbers depend on the CPU (the GPU machine's host was 2x slower or faster from one day's machine to the
next); compare the two paths, and commits, on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    sys.exit("host_overhead: set TRITON_INTERPRET=1 (the ops run on CPU tensors with their launches stubbed)")

import torch  # noqa: E402

from matten_kernels import bi_selective_scan, selective_scan, video_attention  # noqa: E402
from matten_kernels.conv1d import bi_depthwise_conv1d_silu  # noqa: E402


def stub_launches():
    """Every launcher module binds ``launch`` at import: replace each binding with a no-op."""
    from matten_kernels.attention import triton_bwd as ab, triton_fwd as af
    from matten_kernels.conv1d import triton_bwd as cb, triton_fwd as cf
    from matten_kernels.selective_scan import triton_bwd as sb, triton_fwd as sf

    for module in (af, ab, cf, cb, sf, sb):
        module.launch = lambda *args, **kwargs: None


def cases():
    """name -> (leaves, fn): small tensors (the host cost does not depend on the size)."""
    r = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    b, d, L, N = 2, 64, 256, 16
    scan = dict(u=r(b, d, L), delta=r(b, d, L), A=(-torch.rand(d, N)).requires_grad_(), B=r(b, N, L), C=r(b, N, L),
                D=r(d), z=r(b, d, L), delta_bias=r(d))
    qkv = r(2, 4 * 16, 3, 2, 32)
    conv = dict(x=r(b, d, L), w=r(d, 4), bias=r(d), w_b=r(d, 4), bias_b=r(d))
    return {
        "selective_scan (z, D, bias, softplus)": lambda: selective_scan(*scan.values(), True, backend="triton"),
        "bi_selective_scan (Vim v1)": lambda: bi_selective_scan(*scan.values(), True, A_b=scan["A"],
                                                                backend="triton"),
        "bi_depthwise_conv1d_silu": lambda: sum(bi_depthwise_conv1d_silu(*conv.values(), backend="triton")),
        "video_attention temporal": lambda: video_attention(*qkv.unbind(2), num_frames=4, axis="temporal",
                                                            backend="triton"),
    }


def time_fwd_bwd(fn, rounds, calls):
    def one():
        out = fn()
        out.backward(torch.ones_like(out))

    for _ in range(5):
        one()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            one()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return min(per_call), statistics.median(per_call)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stub_launches()
    results = []
    import importlib

    modules = [importlib.import_module(m) for m in ("matten_kernels.selective_scan._ops",
                                                     "matten_kernels.conv1d.interface",
                                                     "matten_kernels.attention.interface")]
    for name, fn in cases().items():
        for path, forced in (("autograd.Function (eager default)", False), ("torch.library custom op", True)):
            for module in modules:  # each imported use_custom_op by name
                module.use_custom_op = lambda forced=forced: forced
            lo, med = time_fwd_bwd(fn, args.rounds, args.calls)
            results.append(dict(op=name, path=path, min_us=lo, median_us=med))
            print(f"{name:40s} {path:36s} fwd+bwd host min {lo:6.0f} us, median {med:6.0f} us", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(cpu_threads=1, torch=torch.__version__, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
