"""A/B of the depthwise conv1d + SiLU backward kernels at the mixer's shapes (time-contiguous x, bf16, both directions).

Variants (``MATTEN_CONV_BWD``): ``old`` (the per-tap kernel: every gate recomputed at the four positions that use
it, 8 x 64 tiles), ``gather`` (the default: each gate once a position, shifted values gathered within 8 x 128 tiles).
Session 15 also measured the gather kernel on 8 x 64 tiles (``results/conv-bwd-ab-...-1fdba31.json``). Each variant's
gradients are checked against ``old``'s; medians of ``triton.testing.do_bench`` (ms) and the fraction of the byte floor
(2 B x (3 reads + 1 write) of (batch, channels, L) at 3.0 TB/s).

Usage (device): PYTHONPATH=. python benchmarks/conv_bwd_ab.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton.testing

from matten_kernels.conv1d.triton_bwd import dwconv_silu_bwd_launch

SHAPES = {"global XL": (2, 2304, 4096), "spatial XL": (32, 2304, 256)}
VARIANTS = ("old", "gather")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name, (b, d, L) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
        x, dy, dy_b = r(b, d, L), r(b, d, L), r(b, d, L)
        w, bias, w_b, bias_b = 0.5 * r(d, 4), r(d), 0.5 * r(d, 4), r(d)
        want = None
        for v in VARIANTS:
            os.environ["MATTEN_CONV_BWD"] = v
            fn = lambda: dwconv_silu_bwd_launch(dy, dy_b, x, w, bias, w_b, bias_b)  # noqa: E731
            got = fn()
            if want is None:
                want = got
            err = max(((a.float() - c.float()).abs().max() / (1e-6 + c.float().abs().max())).item()
                      for a, c in zip(got, want))
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            floor = 2 * 4 * b * d * L / 3.0e12 * 1e3
            rows.append(dict(shape=name, variant=v, ms=round(ms, 4), floor_frac=round(floor / ms, 3),
                             rel_err_vs_old=err))
            print(f"{name:11s} {v:10s} {ms:.4f} ms  floor frac {floor / ms:.3f}  rel err vs old {err:.1e}")
    os.environ.pop("MATTEN_CONV_BWD")
    if args.out:
        with open(os.path.join(args.out, "conv_bwd_ab.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
