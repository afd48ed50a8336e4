"""A/B of the Triton lanes backward (triton_bwd_lanes.py) against the segment backward, launcher level, one call.

For each shape: the forward (the op's choice) once for the saved states, then every backward variant: its gradients
against the segment backward's (max |diff| / max |segment|, bf16 rounding expected), and its median time
(triton.testing.do_bench). Variants are meta-parameter overrides of the lanes kernel (``--variants
"name=dict;name=dict"``), e.g. ``"reduce={'BLOCK_REDUCE': True};warp={'BLOCK_REDUCE': False}"``.

Usage (device): PYTHONPATH=. python benchmarks/triton_lanes_bwd_ab.py --commit SHA --out $OUT [--shapes "global XL"]
"""

from __future__ import annotations

import argparse
import ast
import json
import os

import torch

from _scan_common import SHAPES, bench, env_info, scan_inputs
from matten_kernels.selective_scan import triton_bwd, triton_bwd_lanes, triton_fwd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="global XL,global S,long")
    p.add_argument("--variants", default="default={}")
    p.add_argument("--z", action="store_true", help="with a z gate")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    variants = [(v.split("=", 1)[0], ast.literal_eval(v.split("=", 1)[1])) for v in args.variants.split(";")]
    info = env_info(args.commit)
    print(info)
    results = []
    for shape in args.shapes.split(","):
        b, d, N, L = SHAPES[shape]
        x = scan_inputs(b, d, N, L, torch.bfloat16)
        z = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16) if args.z else None
        u, delta, A, B, C, D, bias = (x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
        # states every SAVE_STEPS (64) steps, which both backwards read (the op saves fewer for the lanes one)
        _, _, states, _ = triton_fwd.selective_scan_fwd(u, delta, A, B, C, D, z, bias, None, True)
        dout = torch.randn_like(u)
        common = (dout, None, u, delta, A, B, C, D, z, bias, None, states, True)
        ref = triton_bwd.selective_scan_bwd(*common, deterministic=False)
        t_seg = bench(lambda: triton_bwd.selective_scan_bwd(*common, deterministic=False))
        row = dict(shape=shape, segment_ms=t_seg, variants={})
        print(f"{shape}: segment backward {t_seg:.3f} ms")
        for name, over in variants:
            triton_bwd_lanes._META_OVERRIDES.clear()
            triton_bwd_lanes._META_OVERRIDES.update(over)
            try:
                g = triton_bwd_lanes.selective_scan_bwd_lanes(*common)
                errs = {k: ((g[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max().clamp_min(1e-30)
                            ).item() for k in ref if ref[k] is not None}
                t = bench(lambda: triton_bwd_lanes.selective_scan_bwd_lanes(*common))
                row["variants"][name] = dict(ms=t, rel_err=errs)
                print(f"  {name:14s} {t:.3f} ms  worst rel err {max(errs.values()):.2e} "
                      f"({max(errs, key=errs.get)})  {over}")
            except Exception as e:  # noqa: BLE001
                row["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                print(f"  {name}: {type(e).__name__}: {str(e)[:300]}")
        results.append(row)
    triton_bwd_lanes._META_OVERRIDES.clear()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"triton-lanes-bwd-ab-{info['gpu'].replace(' ', '-')}-{args.commit}.json")
    with open(path, "w") as fh:
        json.dump(dict(env=info, z=args.z, results=results), fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
