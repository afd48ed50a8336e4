"""Where the host time of an eager bidirectional Triton scan fwd+bwd goes (GPU): cProfile over repeated calls.

The Vim v2 inputs of ``bi_short_sweep.py`` (batch 2, d_inner 2304, N 16, bf16, with z) at a short global length,
where the call is host-bound (benchmarks/NOTES_scan.md).
Usage (device): PYTHONPATH=. python benchmarks/host_profile_bi.py [--length 1024] [--steps 50] [--top 30]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bi_short_sweep  # noqa: E402
from host_profile_model import print_host_profile  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    f, b, z = bi_short_sweep.v2_inputs(args.length)
    dout = torch.randn(bi_short_sweep.BATCH, bi_short_sweep.DIM, args.length, device="cuda", dtype=torch.bfloat16)
    leaves = [f[k] for k in f] + [b[k] for k in b] + [z]

    def step():
        for t in leaves:
            t.grad = None
        bi_short_sweep.call(f, b, z).backward(dout)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print_host_profile(step, args.steps, args.top)


if __name__ == "__main__":
    main()
