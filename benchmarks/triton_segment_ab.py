"""A/B of the Triton segment kernels' main pass (triton_fwd.py / triton_bwd.py): meta-parameters such as ``maxnreg``.

The main passes of the segment forward and backward compile at up to 255 registers (8 one-warp programs an SM); a
cap trades spills for more warps. For each shape and direction count: the op's forward, then its backward from the
forward's saved states, with the default build and with each variant (``--variants "name=dict;..."``, e.g.
``"r168={'maxnreg': 168}"``), each checked against the default (out; every gradient) and timed (median ms).

Usage (device): PYTHONPATH=. python benchmarks/triton_segment_ab.py --commit SHA --out $OUT [--shapes "global XL"]
"""

from __future__ import annotations

import argparse
import ast
import json
import os

import torch

from _scan_common import SHAPES, bench, env_info, scan_inputs
from matten_kernels.selective_scan import triton_bwd, triton_fwd


def _set(over):
    for m in (triton_fwd, triton_bwd):
        m.MAIN_META_OVERRIDES.clear()
        m.MAIN_META_OVERRIDES.update(over)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="global XL,spatial XL,long")
    p.add_argument("--variants", default="r168={'maxnreg': 168}")
    p.add_argument("--bi", default="1,2", help="direction counts: 1 (uni), 2 (bidirectional, Vim v2 inputs)")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    variants = [("default", {})] + [(v.split("=", 1)[0], ast.literal_eval(v.split("=", 1)[1]))
                                    for v in args.variants.split(";")]
    info = env_info(args.commit)
    print(info)
    results = []
    for shape in args.shapes.split(","):
        b, d, N, L = SHAPES[shape]
        x = scan_inputs(b, d, N, L, torch.bfloat16)
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
                    errs = {"out": _rel(out, ref[0])}
                    errs.update({k: _rel(v, ref[1][k]) for k, v in g.items() if v is not None and v.numel()})
                    row["variants"][name] = dict(meta=over, fwd_ms=t_f, bwd_ms=t_b, rel_err=errs)
                    print(f"{shape} {'bi' if ndir == 2 else 'uni'} {name:10s} fwd {t_f:.4f}  bwd {t_b:.4f} ms  "
                          f"worst rel err {max(errs.values()):.1e}")
                except Exception as e:  # noqa: BLE001
                    row["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                    print(f"{shape} {name}: {type(e).__name__}: {str(e)[:300]}")
            results.append(row)
    _set({})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"triton-segment-ab-{info['gpu'].replace(' ', '-')}-{args.commit}.json")
    with open(path, "w") as fh:
        json.dump(dict(env=info, results=results), fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
