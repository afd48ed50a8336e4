"""A/B of the Triton segment kernels' main pass (triton_fwd.py / triton_bwd.py): meta-parameters such as ``maxnreg``.

The main passes of the segment forward and backward compile at up to 255 registers (8 one-warp programs an SM); a
cap trades spills for more warps. For each shape and direction count: the op's forward, then its backward from the
forward's saved states, with the default build and with each variant (``--variants "name=dict;..."``, e.g.
``"r168={'maxnreg': 168}"``), each checked against the default (out; every gradient) and timed (median ms).

Usage (device): PYTHONPATH=. python benchmarks/triton_segment_ab.py --commit SHA --out $OUT [--shapes "global XL"]
"""

from __future__ import annotations

import torch

from _scan_common import ab_cases, ab_env, ab_failed, ab_parser, ab_variants, bench, rel_err, scan_inputs, write_ab
from matten_kernels.selective_scan import triton_bwd, triton_fwd


def _set(over):
    for m in (triton_fwd, triton_bwd):
        m.MAIN_META_OVERRIDES.clear()
        m.MAIN_META_OVERRIDES.update(over)


def main():
    p = ab_parser("global XL,spatial XL,long", "r168={'maxnreg': 168}")
    p.add_argument("--bi", default="1,2", help="direction counts: 1 (uni), 2 (bidirectional, Vim v2 inputs)")
    args = p.parse_args()
    variants = [("default", {})] + ab_variants(args.variants)
    info = ab_env(args)
    results = []
    for shape, (b, d, N, L), x in ab_cases(args.shapes):
        xb = scan_inputs(b, d, N, L, torch.bfloat16, seed=1)
        for ndir in map(int, args.bi.split(",")):
            kw = {}
            if ndir == 2:
                kw = dict(u_b=xb["u"], delta_b=xb["delta"], A_b=xb["A"], B_b=xb["B"], C_b=xb["C"], D_b=xb["D"],
                          delta_bias_b=xb["delta_bias"], bidirectional=True)
            fwd_args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], None, True)
            dout = torch.randn_like(x["u"])
            ref = None
            row = dict(shape=shape, directions=ndir, variants={})
            for name, over in variants:
                _set(over)
                try:
                    out, _, states, states_b = triton_fwd.selective_scan_fwd(*fwd_args, **kw)
                    bkw = dict(kw, states_b=states_b) if ndir == 2 else {}
                    bwd_args = (dout, None, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"],
                                None, states, True)
                    g = triton_bwd.selective_scan_bwd(*bwd_args, deterministic=False, **bkw)
                    t_f = bench(lambda: triton_fwd.selective_scan_fwd(*fwd_args, **kw))
                    t_b = bench(lambda: triton_bwd.selective_scan_bwd(*bwd_args, deterministic=False, **bkw))
                    if ref is None:
                        ref = (out, g)
                    errs = {"out": rel_err(out, ref[0])}
                    errs.update({k: rel_err(v, ref[1][k]) for k, v in g.items() if v is not None and v.numel()})
                    row["variants"][name] = dict(meta=over, fwd_ms=t_f, bwd_ms=t_b, rel_err=errs)
                    print(f"{shape} {'bi' if ndir == 2 else 'uni'} {name:10s} fwd {t_f:.4f}  bwd {t_b:.4f} ms  "
                          f"worst rel err {max(errs.values()):.1e}")
                except Exception as e:  # noqa: BLE001
                    ab_failed(row, name, e, f"{shape} {name}")
            results.append(row)
    _set({})
    write_ab("triton-segment-ab", info, args.out, results=results)


if __name__ == "__main__":
    main()
