"""Selective scan benchmark: fwd and fwd+bwd medians (triton.testing.do_bench) on the SPEC section 7 shapes.

    PYTHONPATH=. python benchmarks/bench_selective_scan.py [--dtypes bf16,fp32] [--shapes "global XL,long"]
        [--mamba-build DIR] [--ref] [--sweep] [--commit SHA]

--shapes also takes the extra shapes of _scan_common.EXTRA_SHAPES ("global XL d8", "global XL d4": d_state 8 / 4).
Providers: triton (ours), cuda (matten's extension, when built), mamba-ssm (the mamba_ssm package, or its
selective_scan_cuda extension built by build_mamba_scan.py into DIR), ref (only with --ref: a Python loop over L).
Per row: ms, GB/s (bytes model in _scan_common.py), fraction of the memory/exp floor, peak memory of fwd+bwd (MB
above the inputs). Writes JSON to benchmarks/results/. ``--sweep`` times the Triton kernels under several
scan_config configs (state split, warps, segments) to pick scan_config's rules.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scan_common import (ANCHORS, DTYPES, EXTRA_SHAPES, SHAPES, bench, bytes_model, cuda_provider,  # noqa: E402
                          env_info, floor_ms, log_row, mamba_provider, peak_mem_mb, print_table, scan_inputs,
                          start_row_log, write_results)

from matten_kernels import selective_scan, selective_scan_ref  # noqa: E402

ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def providers(args):
    prov = {"triton": lambda u, dl, A, B, C, D, db, sp: selective_scan(u, dl, A, B, C, D, None, db, sp,
                                                                      backend="triton")}
    ok, why = cuda_provider() if not args.no_cuda else (None, "--no-cuda")
    if ok:
        prov["cuda"] = lambda u, dl, A, B, C, D, db, sp: selective_scan(u, dl, A, B, C, D, None, db, sp,
                                                                        backend="cuda")
    else:
        print(f"[skip cuda] {why}")
    fn, why = mamba_provider(args.mamba_build)
    if fn is not None:
        prov["mamba-ssm"] = fn
        print(f"[mamba-ssm] using {why}")
    else:
        print(f"[skip mamba-ssm] {why}; compare with the SPEC section 7 anchors (column 'anchor')")
    if args.ref:
        prov["ref"] = lambda u, dl, A, B, C, D, db, sp: selective_scan_ref(u, dl, A, B, C, D, None, db, sp)
    return prov


def run(args):
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        elt = torch.finfo(dtype).bits // 8
        for sname in args.shapes.split(","):
            b, d, N, L = {**SHAPES, **EXTRA_SHAPES}[sname]
            x = scan_inputs(b, d, N, L, dtype, requires_grad=True)
            inp = [x[k] for k in ARGS]
            dout = torch.randn(b, d, L, device="cuda", dtype=dtype)
            for pname, fn in providers_cache.items():
                row = dict(dtype=dname, shape=sname, provider=pname)
                try:
                    with torch.no_grad():
                        row["fwd_ms"] = bench(lambda: fn(*inp, True))

                    def fwd_bwd():
                        fn(*inp, True).backward(dout)

                    row["fwdbwd_ms"] = bench(fwd_bwd, grad_to_none=inp)
                    row["peak_MB"] = round(peak_mem_mb(fwd_bwd), 1)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
                    rows.append(row)
                    continue
                fl_f, fl_fb = floor_ms(b, d, N, L, elt), floor_ms(b, d, N, L, elt, bwd=True)
                row["fwd_GBps"] = round(bytes_model(b, d, N, L, elt) / row["fwd_ms"] / 1e6)
                row["fwd_floor_frac"] = round(fl_f / row["fwd_ms"], 3)
                row["fwdbwd_floor_frac"] = round(fl_fb / row["fwdbwd_ms"], 3)
                if dname == "bf16" and sname in ANCHORS:
                    row["anchor_fwd"], row["anchor_fwdbwd"] = ANCHORS[sname][:2]
                row["fwd_ms"], row["fwdbwd_ms"] = round(row["fwd_ms"], 4), round(row["fwdbwd_ms"], 4)
                rows.append(row)
                log_row(row)
            del x, inp
            torch.cuda.empty_cache()
    return rows


def sweep(args):
    """Time the launchers directly under explicit configs (fwd, bwd separately), bf16.

    Configs are scan_config's (BLOCK_D, NH, NL, CHUNK, num_warps, n_seg): the state split (NH in registers, NL lanes),
    warps per program and the number of sequence segments around the default.
    """
    from matten_kernels.selective_scan.triton_bwd import selective_scan_bwd
    from matten_kernels.selective_scan.triton_fwd import scan_config, selective_scan_fwd

    def variants(default):
        _, NH, NL, CH, nw, n_seg = default
        out = {default}
        BN = NH * NL
        for nl in {max(1, NL // 2), NL, NL * 2}:
            if nl > BN or nl > 32:
                continue
            for w in (1, 2):
                for seg in {n_seg, n_seg * 2}:
                    out.add(((32 // nl) * w, BN // nl, nl, CH, w, seg))
        return sorted(out)

    rows = []
    for sname in args.shapes.split(","):
        b, d, N, L = {**SHAPES, **EXTRA_SHAPES}[sname]
        x = scan_inputs(b, d, N, L, torch.bfloat16)
        dout = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16)
        fwd_default = scan_config(b, d, N, L, torch.bfloat16, device=0)
        bwd_default = scan_config(b, d, N, L, torch.bfloat16, device=0, backward=True)
        _, _, states, _ = selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None,
                                             x["delta_bias"], None, True)
        for phase, default in (("fwd", fwd_default), ("bwd", bwd_default)):
            for cfg in variants(default):
                row = dict(shape=sname, phase=phase, cfg=str(cfg), default="*" if cfg == default else "")
                try:
                    if phase == "fwd":
                        f = lambda: selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],  # noqa
                                                       None, x["delta_bias"], None, True, config=cfg)
                    else:
                        f = lambda: selective_scan_bwd(dout, None, x["u"], x["delta"], x["A"], x["B"], x["C"],  # noqa
                                                       x["D"], None, x["delta_bias"], None, states, True, config=cfg)
                    row["ms"] = round(bench(f), 4)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
            mine = [r for r in rows if r["shape"] == sname and r["phase"] == phase and "ms" in r]
            if mine:
                best = min(mine, key=lambda r: r["ms"])
                dflt = [r for r in mine if r["default"]]
                print(f"sweep {sname} {phase}: best {best['cfg']} {best['ms']} ms; default {default} "
                      f"{dflt[0]['ms'] if dflt else 'failed'} ms", flush=True)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--mamba-build", default=None, help="folder holding selective_scan_cuda (build_mamba_scan.py)")
    p.add_argument("--ref", action="store_true", help="also time the reference (slow: a Python loop over L)")
    p.add_argument("--no-cuda", action="store_true", help="leave out our CUDA backend (its first use builds it: minutes)")
    p.add_argument("--sweep", action="store_true", help="time Triton configs instead of the provider table")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args()
    info = env_info(args.commit)
    print(info)
    if args.sweep:
        rows = sweep(args)
        print(f"results: {write_results('scan-sweep', rows, info, args.out)}")
        print_table(rows, ["shape", "phase", "cfg", "default", "ms", "error"])
    else:
        providers_cache = providers(args)
        start_row_log("bench_selective_scan", info, args.out)
        rows = run(args)
        print(f"results: {write_results('bench_selective_scan', rows, info, args.out)}")
        print_table(rows, ["dtype", "shape", "provider", "fwd_ms", "fwdbwd_ms", "anchor_fwd", "anchor_fwdbwd",
                           "fwd_GBps", "fwd_floor_frac", "fwdbwd_floor_frac", "peak_MB", "error"])
