"""A/B of the Triton lanes backward (triton_bwd_lanes.py) against the segment backward, launcher level, one call.

For each shape: the forward (the op's choice) once for the saved states, then every backward variant: its gradients
against the segment backward's (max |diff| / max |segment|, bf16 rounding expected), and its median time
(triton.testing.do_bench). Variants are meta-parameter overrides of the lanes kernel (``--variants
"name=dict;name=dict"``), e.g. ``"reduce={'BLOCK_REDUCE': True};warp={'BLOCK_REDUCE': False}"``.

Usage (device): PYTHONPATH=. python benchmarks/triton_lanes_bwd_ab.py --commit SHA --out $OUT [--shapes "global XL"]
"""

from __future__ import annotations

import torch

from _scan_common import ab_cases, ab_env, ab_failed, ab_parser, ab_variants, bench, rel_err, write_ab
from matten_kernels.selective_scan import triton_bwd, triton_bwd_lanes, triton_fwd


def main():
    p = ab_parser("global XL,global S,long", "default={}")
    p.add_argument("--z", action="store_true", help="with a z gate")
    args = p.parse_args()
    variants = ab_variants(args.variants)
    info = ab_env(args)
    results = []
    for shape, (b, d, N, L), x in ab_cases(args.shapes):
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
                errs = {k: rel_err(g[k], ref[k]) for k in ref if ref[k] is not None}
                t = bench(lambda: triton_bwd_lanes.selective_scan_bwd_lanes(*common))
                row["variants"][name] = dict(ms=t, rel_err=errs)
                print(f"  {name:14s} {t:.3f} ms  worst rel err {max(errs.values()):.2e} "
                      f"({max(errs, key=errs.get)})  {over}")
            except Exception as e:  # noqa: BLE001
                ab_failed(row, name, e, f"  {name}")
        results.append(row)
    triton_bwd_lanes._META_OVERRIDES.clear()
    write_ab("triton-lanes-bwd-ab", info, args.out, z=args.z, results=results)


if __name__ == "__main__":
    main()
