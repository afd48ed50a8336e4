"""A/B of the Triton lanes forward (triton_fwd_lanes.py): channels a warp and meta-parameters, launcher level.

For each shape: the forward with one channel a warp (CPW 1) is the reference; every variant (``--variants
"name=CPW:dict;..."``, e.g. ``"cpw2=2:{'maxnreg': 168}"``) is checked against it (out, the saved states and the last
state: max |diff| / max |reference|) and timed (median, triton.testing.do_bench). The states are saved every
``--save`` steps (128: the lanes backward's window at 2 channels a warp, what the op saves for it at global XL).

Usage (device): PYTHONPATH=. python benchmarks/triton_lanes_fwd_ab.py --commit SHA --out $OUT [--shapes "global XL"]
"""

from __future__ import annotations

import argparse
import ast
import json
import os

import torch

from _scan_common import SHAPES, bench, env_info, scan_inputs
from matten_kernels.selective_scan import triton_fwd_lanes


def _run(cpw, over, args):
    triton_fwd_lanes.CPW_OVERRIDE = cpw
    triton_fwd_lanes.META_OVERRIDES.clear()
    triton_fwd_lanes.META_OVERRIDES.update(over)
    try:
        return triton_fwd_lanes.selective_scan_fwd_lanes(*args)
    finally:
        triton_fwd_lanes.CPW_OVERRIDE = None
        triton_fwd_lanes.META_OVERRIDES.clear()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="global XL,global S,long")
    p.add_argument("--variants", default="cpw2=2:{}")
    p.add_argument("--save", type=int, default=128)
    p.add_argument("--z", action="store_true", help="with a z gate")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    variants = []
    for v in args.variants.split(";"):
        name, spec = v.split("=", 1)
        cpw, over = spec.split(":", 1)
        variants.append((name, int(cpw), ast.literal_eval(over)))
    info = env_info(args.commit)
    print(info)
    results = []
    for shape in args.shapes.split(","):
        b, d, N, L = SHAPES[shape]
        x = scan_inputs(b, d, N, L, torch.bfloat16)
        z = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16) if args.z else None
        call = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], z, x["delta_bias"], None, True, args.save)
        ref = _run(1, {}, call)
        t_ref = bench(lambda: _run(1, {}, call))
        row = dict(shape=shape, cpw1_ms=t_ref, variants={})
        print(f"{shape}: CPW 1 {t_ref:.4f} ms")
        for name, cpw, over in variants:
            try:
                got = _run(cpw, over, call)
                errs = {k: ((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                        for k, g, r in zip(("out", "last_state", "states"), got, ref)}
                t = bench(lambda: _run(cpw, over, call))
                row["variants"][name] = dict(cpw=cpw, meta=over, ms=t, rel_err=errs)
                print(f"  {name:12s} {t:.4f} ms ({t / t_ref:.3f}x)  worst rel err {max(errs.values()):.2e} "
                      f"({max(errs, key=errs.get)})  CPW {cpw} {over}")
            except Exception as e:  # noqa: BLE001
                row["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                print(f"  {name}: {type(e).__name__}: {str(e)[:300]}")
        results.append(row)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"triton-lanes-fwd-ab-{info['gpu'].replace(' ', '-')}-{args.commit}.json")
    with open(path, "w") as fh:
        json.dump(dict(env=info, z=args.z, save=args.save, results=results), fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
