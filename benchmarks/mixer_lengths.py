"""BiMamba mixer fwd+bwd at 4096 tokens and at 4096 + condition tokens, Triton vs CUDA scan (one run, H100).

The Matten model's global blocks scan n condition tokens before the 4096 video tokens; this measures what that does to
the mixer on each scan backend (the lanes paths want L a multiple of 16 and of their window).
Usage (device): PYTHONPATH=. python benchmarks/mixer_lengths.py [--lengths 4096,4097,4098] --out $OUT
       [--profile 4097,triton]  (the top CUDA kernels of one fwd+bwd instead)
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from _scan_common import bench, env_info
from matten_kernels.modules import BiMamba


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="4096,4097,4098")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=".")
    p.add_argument("--profile", default=None, metavar="L,BACKEND", help="only profile the mixer at L on BACKEND")
    args = p.parse_args()
    if args.profile:
        L, backend = args.profile.split(",")
        return profile(int(L), backend)
    info = env_info(args.commit)
    m = BiMamba(1152, d_state=16, bimamba="v2").cuda().to(torch.bfloat16)
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        h = torch.randn(2, L, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(h)
        leaves = [h] + list(m.parameters())
        for backend in ("triton", "cuda"):
            m.backend = backend

            def fb():
                m(h).backward(g)

            ms = bench(fb, grad_to_none=leaves)
            rows.append(dict(L=L, backend=backend, fwdbwd_ms=round(ms, 4)))
            print(f"L {L}  {backend:6s}  mixer fwd+bwd {ms:.3f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"mixer-lengths-{info['gpu'].replace(' ', '-')}-{args.commit}.json"), "w") as fh:
        json.dump(dict(env=info, rows=rows), fh, indent=1)



def profile(L: int, backend: str, top: int = 20):
    """The mixer's fwd+bwd at L tokens under torch.profiler: the CUDA kernels taking the most time."""
    from torch.profiler import ProfilerActivity, profile as prof

    m = BiMamba(1152, d_state=16, bimamba="v2", backend=backend).cuda().to(torch.bfloat16)
    h = torch.randn(2, L, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(h)  # a dense gradient, as the timed runs use (sum()'s is a stride-0 expansion)
    for _ in range(3):
        m(h).backward(g)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        m(h).backward(g)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


if __name__ == "__main__":
    main()
