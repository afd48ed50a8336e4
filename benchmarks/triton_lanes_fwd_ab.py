"""A/B of the Triton lanes forward (triton_fwd_lanes.py): channels a warp and meta-parameters, launcher level.

For each shape: the forward with one channel a warp (CPW 1) is the reference (``--segment-ref``: the segment
kernel, the op's other choice; ``--bi``: the segment kernel's bidirectional forward); every variant (``--variants
"name=CPW:dict;..."``, e.g. ``"cpw2=2:{'maxnreg': 168}"``; CPW 0: the rule's choice; ``{'maxnreg': None}``:
uncapped) is checked against it (out, the saved states and the last state; bi: out and both directions' states:
max |diff| / max |reference|) and timed (median, triton.testing.do_bench). The states are saved every ``--save``
steps (128: the lanes backward's window at 2 channels a warp, what the op saves for it at global XL; bi: 64, what
the segment backward reads).

Usage (device): PYTHONPATH=. python benchmarks/triton_lanes_fwd_ab.py --commit SHA --out $OUT [--shapes "global XL"]
"""

from __future__ import annotations

import ast

import torch

from _scan_common import ab_cases, ab_env, ab_failed, ab_parser, bench, rel_err, scan_inputs, write_ab
from matten_kernels.selective_scan import triton_fwd, triton_fwd_lanes


def _run(cpw, over, args, bi=False):
    if cpw < 0:  # the segment kernel (the bidirectional reference; uni: --segment-ref)
        if bi:
            return triton_fwd.selective_scan_fwd(*args[:10], **args[10], bidirectional=True)
        return triton_fwd.selective_scan_fwd(*args[:10], save=args[10])[:3]
    triton_fwd_lanes.CPW_OVERRIDE = cpw or None
    triton_fwd_lanes.META_OVERRIDES.clear()
    triton_fwd_lanes.META_OVERRIDES.update(over)
    try:
        if bi:
            return triton_fwd_lanes.bi_selective_scan_fwd_lanes(*args[:8], *args[10].values(), True, False)
        return triton_fwd_lanes.selective_scan_fwd_lanes(*args)
    finally:
        triton_fwd_lanes.CPW_OVERRIDE = None
        triton_fwd_lanes.META_OVERRIDES.clear()


def main():
    p = ab_parser("global XL,global S,long", "cpw2=2:{}")
    p.add_argument("--save", type=int, default=128)
    p.add_argument("--z", action="store_true", help="with a z gate")
    p.add_argument("--segment-ref", action="store_true", help="the uni reference is the segment kernel (the op's "
                   "other choice), not the lanes kernel at CPW 1")
    p.add_argument("--bi", action="store_true", help="the bidirectional forward (Vim v2 inputs): the segment kernel "
                   "is the reference, each variant runs the lanes kernels' two launches")
    args = p.parse_args()
    variants = []
    for v in args.variants.split(";"):
        name, spec = v.split("=", 1)
        cpw, over = spec.split(":", 1)
        variants.append((name, int(cpw), ast.literal_eval(over)))
    info = ab_env(args)
    results = []
    for shape, (b, d, N, L), x in ab_cases(args.shapes):
        z = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16) if args.z else None
        call = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], z, x["delta_bias"], None, True, args.save)
        names = ("out", "last_state", "states")
        ref_cpw = -1 if args.segment_ref else 1
        if args.bi:  # (u, delta, A, B, C, D, z, delta_bias, -, -, {the backward direction's inputs})
            xb = scan_inputs(b, d, N, L, torch.bfloat16, seed=1)
            call = call[:10] + (dict(u_b=xb["u"], delta_b=xb["delta"], A_b=xb["A"], B_b=xb["B"], C_b=xb["C"],
                                     D_b=xb["D"], delta_bias_b=xb["delta_bias"]),)
            names, ref_cpw = ("out", "states", "states_b"), -1
        ref = _run(ref_cpw, {}, call, args.bi)
        if args.bi:
            ref = (ref[0], ref[2], ref[3])
        t_ref = bench(lambda: _run(ref_cpw, {}, call, args.bi))
        row = dict(shape=shape, reference_ms=t_ref, variants={})
        print(f"{shape}: {'segment kernel' if ref_cpw < 0 else 'CPW 1'} {t_ref:.4f} ms")
        for name, cpw, over in variants:
            try:
                got = _run(cpw, over, call, args.bi)
                errs = {k: rel_err(g, r) for k, g, r in zip(names, got, ref)}
                t = bench(lambda: _run(cpw, over, call, args.bi))
                row["variants"][name] = dict(cpw=cpw, meta=over, ms=t, rel_err=errs)
                print(f"  {name:12s} {t:.4f} ms ({t / t_ref:.3f}x)  worst rel err {max(errs.values()):.2e} "
                      f"({max(errs, key=errs.get)})  CPW {cpw} {over}")
            except Exception as e:  # noqa: BLE001
                ab_failed(row, name, e, f"  {name}")
        results.append(row)
    write_ab("triton-lanes-fwd-ab", info, args.out, z=args.z, bi=args.bi, save=args.save, results=results)


if __name__ == "__main__":
    main()
