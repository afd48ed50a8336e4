"""A/B of the Triton lanes backward (triton_bwd_lanes.py) against the segment backward, launcher level, one call.

For each shape: the forward (the segment kernel) once for the states every SAVE_STEPS steps and the segment
backward from them (the reference), then every variant: the forward again for the states a lanes window apart (the
variant's window: its overrides can change it), the lanes backward's gradients against the reference's (max |diff|
/ max |reference|, bf16 rounding expected), and its median time (triton.testing.do_bench, the backward alone).
Variants are meta-parameter overrides of the lanes kernel (``--variants "name=dict;name=dict"``), e.g.
``"base={};r240={'maxnreg': 240}"``. ``--bi``: the bidirectional backward (Vim v2 inputs; the lanes kernel's two
launches against the segment kernel's one).

Usage (device): PYTHONPATH=. python benchmarks/triton_lanes_bwd_ab.py --commit SHA --out $OUT [--shapes "global XL"]
    [--z] [--bi]
"""

from __future__ import annotations

import torch

from _scan_common import ab_cases, ab_env, ab_failed, ab_parser, ab_variants, bench, rel_err, scan_inputs, write_ab
from matten_kernels.selective_scan import triton_bwd, triton_bwd_lanes, triton_fwd

_B_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def _backward(lanes: bool, dout, x, z, bi_kw, save):
    """The states every ``save`` steps from the segment forward, then a callable running one backward from them."""
    u, delta, A, B, C, D, bias = (x[k] for k in _B_NAMES)
    _, _, states, states_b = triton_fwd.selective_scan_fwd(u, delta, A, B, C, D, z, bias, None, True,
                                                           bidirectional=bi_kw is not None, save=save,
                                                           **(bi_kw or {}))
    if bi_kw is not None and lanes:
        return lambda: triton_bwd_lanes.bi_selective_scan_bwd_lanes(
            dout, u, delta, A, B, C, D, z, bias, *(bi_kw[k + "_b"] for k in _B_NAMES), states, states_b, True, False)
    if bi_kw is not None:
        return lambda: triton_bwd.selective_scan_bwd(dout, None, u, delta, A, B, C, D, z, bias, None, states, True,
                                                     states_b=states_b, bidirectional=True, deterministic=False,
                                                     **bi_kw)
    if lanes:
        return lambda: triton_bwd_lanes.selective_scan_bwd_lanes(dout, None, u, delta, A, B, C, D, z, bias, None,
                                                                 states, True)
    return lambda: triton_bwd.selective_scan_bwd(dout, None, u, delta, A, B, C, D, z, bias, None, states, True,
                                                 deterministic=False)


def main():
    p = ab_parser("global XL,global S,long", "default={}")
    p.add_argument("--z", action="store_true", help="with a z gate")
    p.add_argument("--bi", action="store_true", help="the bidirectional backward (Vim v2 inputs)")
    args = p.parse_args()
    variants = ab_variants(args.variants)
    info = ab_env(args)
    results = []
    for shape, (b, d, N, L), x in ab_cases(args.shapes):
        z = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16) if args.z else None
        bi_kw = None
        if args.bi:
            xb = scan_inputs(b, d, N, L, torch.bfloat16, seed=1)
            bi_kw = {k + "_b": xb[k] for k in _B_NAMES}
        dout = torch.randn_like(x["u"])
        seg = _backward(False, dout, x, z, bi_kw, triton_fwd.SAVE_STEPS)
        ref = seg()
        t_seg = bench(seg)
        row = dict(shape=shape, segment_ms=t_seg, variants={})
        print(f"{shape}: segment backward {t_seg:.3f} ms")
        for name, over in variants:
            triton_bwd_lanes._META_OVERRIDES.clear()
            triton_bwd_lanes._META_OVERRIDES.update(over)
            try:
                run = _backward(True, dout, x, z, bi_kw, triton_bwd_lanes.lanes_save_steps(x["u"], x["B"], x["C"]))
                g = run()
                errs = {k: rel_err(g[k], ref[k]) for k in ref if ref[k] is not None}
                t = bench(run)
                row["variants"][name] = dict(ms=t, rel_err=errs)
                print(f"  {name:14s} {t:.3f} ms  worst rel err {max(errs.values()):.2e} "
                      f"({max(errs, key=errs.get)})  {over}")
            except Exception as e:  # noqa: BLE001
                ab_failed(row, name, e, f"  {name}")
        results.append(row)
    triton_bwd_lanes._META_OVERRIDES.clear()
    write_ab("triton-lanes-bwd-ab" + ("-bi" if args.bi else ""), info, args.out, z=args.z, results=results)


if __name__ == "__main__":
    main()
