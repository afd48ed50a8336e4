"""A few calls of the CUDA (or Triton) scan at one shape, for Nsight Compute to profile (the script times nothing).

    ncu --clock-control none -k regex:scan_fwd_lanes --launch-skip 2 --launch-count 1 \
        --section SchedulerStats --section WarpStateStats --section SourceCounters \
        python benchmarks/ncu_scan.py --shape global_xl [--bi] [--backward]
    # the Triton lanes backward (kernel _selective_scan_bwd_lanes_kernel):
    ncu ... -k regex:bwd_lanes --launch-skip 2 --launch-count 1 ... python benchmarks/ncu_scan.py --backend triton --backward

Runs the op ``--calls`` times (bf16, the inputs of ``bench_cuda_scan.py``) so that ``--launch-skip`` can pass the
first, cold launch. The CUDA extension is built (or loaded) before the first call (``--backend cuda``).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_cuda_scan import SHAPES, make_inputs, run_fn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="global_xl", choices=sorted(SHAPES))
    ap.add_argument("--bi", action="store_true", help="the bidirectional scan")
    ap.add_argument("--backward", action="store_true", help="fwd+bwd calls instead of forward calls")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    args = ap.parse_args()
    x = make_inputs(*SHAPES[args.shape][0], bi=args.bi, requires_grad=args.backward)
    f, leaves = run_fn(args.backend, args.bi), list(x.values())
    for _ in range(args.calls):
        if args.backward:
            y = f(x)
            torch.autograd.grad(y, leaves, torch.ones_like(y))
        else:
            with torch.no_grad():
                f(x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
