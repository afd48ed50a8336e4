"""Bidirectional scan and BiMamba mixer benchmark (issue 3): fwd and fwd+bwd medians, peak memory.

    PYTHONPATH=. python benchmarks/bench_bidirectional.py [--dtypes bf16] [--shapes ...] [--mamba-build DIR]
        [--no-mixer] [--cudagraph] [--commit SHA]

Op rows (Vim v2: every *_b input distinct; bf16; delta_softplus, D, delta_bias, no z as the SPEC anchors):
  ours           bi_selective_scan, both directions in one launch, no flipped copies
  ours-compose   Vim-style composition over our selective_scan: scan(x) + flip(scan(flip(x_b)))
  mamba-compose  the same composition over mamba-ssm (when importable / built by build_mamba_scan.py)
  sdpa           global softmax attention over the same tokens (B, L tokens, 16 heads x dim/32) from a packed qkv
Mixer rows (global XL: batch 2, 4096 tokens, d_model = dim / 2): matten_kernels.modules.BiMamba (fast path) vs a
Vim-style composition of the same parameters (``baselines.VimBiMamba``, the model benchmark's baseline mixer: Vim's
in_proj layout, F.conv1d with flips, two gated scans with flips; scans by mamba-ssm when available, else by ours).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scan_common import (ANCHORS, DTYPES, SHAPES, bench, env_info, floor_ms, graphed_ms, host_ms,  # noqa: E402
                          log_row, mamba_provider, peak_mem_mb, print_table, scan_inputs, start_row_log,
                          write_results)

from matten_kernels import bi_selective_scan, selective_scan  # noqa: E402
from matten_kernels.selective_scan import cuda as scan_cuda  # noqa: E402
from matten_kernels.selective_scan import interface as scan_interface  # noqa: E402

FWD = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def compose(scan):
    """Vim-style bidirectional composition with flipped copies over a unidirectional scan."""
    def f(x, xb):
        y_f = scan(*(x[k] for k in FWD), True)
        flip = lambda t: t.flip(-1)  # noqa: E731
        y_b = scan(flip(xb["u"]), flip(xb["delta"]), xb["A"], flip(xb["B"]), flip(xb["C"]), xb["D"],
                   xb["delta_bias"], True)
        return y_f + y_b.flip(-1)
    return f


def op_providers(args):
    prov = {"ours": lambda x, xb: bi_selective_scan(*(x[k] for k in FWD[:6]), None, x["delta_bias"], True,
                                                    **{k + "_b": xb[k] for k in FWD}, backend="triton"),
            "ours-compose": compose(lambda u, dl, A, B, C, D, db, sp: selective_scan(u, dl, A, B, C, D, None, db, sp,
                                                                                     backend="triton"))}
    from matten_kernels.selective_scan import cuda as cuda_mod

    if args.no_cuda or not cuda_mod.is_available():
        print("[skip cuda] " + ("--no-cuda" if args.no_cuda else "the CUDA extension cannot be built here"))
    else:
        prov["ours-cuda"] = lambda x, xb: bi_selective_scan(*(x[k] for k in FWD[:6]), None, x["delta_bias"], True,
                                                            **{k + "_b": xb[k] for k in FWD}, backend="cuda")
    fn, why = mamba_provider(args.mamba_build)
    if fn is not None:
        prov["mamba-compose"] = compose(fn)
        print(f"[mamba-ssm] using {why}")
    else:
        print(f"[skip mamba-compose] {why}; compare with the SPEC section 7 anchors (column 'anchor')")
    return prov


def sdpa_global(batch, L, dim, dtype):
    """Global attention over L tokens, heads of 72 as Matten (16 x 72 = 1152 = dim / 2), from a packed qkv."""
    heads, hd = 16, (dim // 2) // 16
    qkv = torch.randn(batch, L, 3, heads, hd, device="cuda", dtype=dtype, requires_grad=True)

    def f():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(batch, L, heads * hd)
    return f, [qkv]


def run_ops(args, rows):
    prov = op_providers(args)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        elt = torch.finfo(dtype).bits // 8
        for sname in filter(None, args.shapes.split(",")):  # --shapes "": the mixer rows only
            b, d, N, L = SHAPES[sname]
            x = scan_inputs(b, d, N, L, dtype, seed=0, requires_grad=True)
            xb = scan_inputs(b, d, N, L, dtype, seed=1, requires_grad=True)
            leaves = list(x.values()) + list(xb.values())
            dout = torch.randn(b, d, L, device="cuda", dtype=dtype)
            items = list(prov.items())
            if sname.startswith("global"):
                f_attn, attn_leaves = sdpa_global(b, L, d, dtype)
                items.append(("sdpa", None))
            for pname, fn in items:
                row = dict(dtype=dname, shape=sname, provider=pname)
                try:
                    if pname == "sdpa":
                        call, lv = f_attn, attn_leaves
                        g = torch.randn_like(f_attn())
                    else:
                        call, lv, g = (lambda fn=fn: fn(x, xb)), leaves, dout
                    with torch.no_grad():
                        row["fwd_ms"] = round(bench(call), 4)

                    def fb():
                        call().backward(g)

                    row["fwdbwd_ms"] = round(bench(fb, grad_to_none=lv), 4)
                    row["peak_MB"] = round(peak_mem_mb(fb), 1)
                    if pname != "sdpa":
                        row["fwd_floor_frac"] = round(floor_ms(b, d, N, L, elt, directions=2) / row["fwd_ms"], 3)
                        row["fwdbwd_floor_frac"] = round(floor_ms(b, d, N, L, elt, True, 2) / row["fwdbwd_ms"], 3)
                    if dname == "bf16" and pname != "sdpa":
                        row["anchor_fwd"], row["anchor_fwdbwd"] = ANCHORS[sname][2:]
                    if dname == "bf16" and pname == "sdpa" and sname == "global XL":
                        row["anchor_fwd"], row["anchor_fwdbwd"] = 0.44, 1.89
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
                rows.append(row)
                log_row(row)
            del x, xb, leaves
            torch.cuda.empty_cache()


def run_mixer(args, rows):
    try:
        from matten_kernels.modules import BiMamba
    except Exception as e:  # noqa: BLE001
        print(f"[skip mixer] matten_kernels.modules.BiMamba not importable ({type(e).__name__}: {e})")
        return
    if args.mamba_build:  # the model benchmark's baseline mixer (benchmarks/baselines.py) finds mamba-ssm there
        os.environ.setdefault("MATTEN_MAMBA_BUILD", args.mamba_build)
    from baselines import SCAN_PROVIDER, VimBiMamba

    for sname in args.mixer_shapes.split(","):
        run_mixer_shape(args, rows, sname, BiMamba, VimBiMamba, SCAN_PROVIDER)


def run_mixer_shape(args, rows, sname, BiMamba, VimBiMamba, why):
    """The mixer over SHAPES[sname]'s (batch, L) with d_inner = dim (d_model = dim / 2): ours on the Triton scan, on the
    CUDA scan (its default forward; at spatial XL also with the lanes forward forced, MATTEN_SCAN_FWD_KERNEL=1), and
    Vim's composition over the same parameters."""
    b, d, N, L = SHAPES[sname]
    dtype = torch.bfloat16
    m = BiMamba(d // 2, d_state=N, bimamba="v2").cuda().to(dtype)
    vim = VimBiMamba(m)
    h = torch.randn(b, L, d // 2, device="cuda", dtype=dtype, requires_grad=True)
    leaves = [h] + list(m.parameters())
    g = torch.randn(b, L, d // 2, device="cuda", dtype=dtype)
    mods = [("BiMamba (ours)", m, "triton", None), (f"Vim-style ({why})", vim, None, None)]
    if not args.no_cuda:  # the same module, its scan on the CUDA backend
        mods.insert(1, ("BiMamba (ours, cuda scan)", m, "cuda", None))
        if sname != "global XL":
            mods.insert(2, ("BiMamba (ours, cuda scan, lanes forward)", m, "cuda", "1"))
    if scan_cuda.PREBUILT:  # backend=None takes the installed extension where it serves the shape: say so in a row
        auto = scan_interface.scan_backend(None, h.device, N, L, "bench")
        mods.insert(1, (f"BiMamba (ours, backend=None -> {auto})", m, None, None))
    for pname, mod, backend, fwd_kernel in mods:
        row = dict(dtype="bf16", shape=f"mixer {sname}", provider=pname)
        m.backend = backend
        if fwd_kernel:
            os.environ["MATTEN_SCAN_FWD_KERNEL"] = fwd_kernel
        try:
            with torch.no_grad():
                row["fwd_ms"] = round(bench(lambda: mod(h)), 4)

            def fb():
                mod(h).backward(g)

            row["fwdbwd_ms"] = round(bench(fb, grad_to_none=leaves), 4)
            row["peak_MB"] = round(peak_mem_mb(fb), 1)
            if args.cudagraph:
                row["host_fwdbwd_ms"] = round(host_ms(fb), 4)
                row["graph_fwdbwd_ms"] = round(graphed_ms(fb, leaves), 4)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
        os.environ.pop("MATTEN_SCAN_FWD_KERNEL", None)
        rows.append(row)
        log_row(row)
    m.backend = None


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--mamba-build", default=None)
    p.add_argument("--no-mixer", action="store_true")
    p.add_argument("--mixer-shapes", default="global XL", help='e.g. "global XL,spatial XL"')
    p.add_argument("--no-cuda", action="store_true", help="leave out our CUDA backend (its first use builds it)")
    p.add_argument("--cudagraph", action="store_true",
                   help="mixer rows: also the host ms per eager fwd+bwd call and the fwd+bwd median in a CUDA graph")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    info = env_info(args.commit)
    print(info)
    rows = []
    start_row_log("bench_bidirectional", info, args.out)
    run_ops(args, rows)
    if not args.no_mixer:
        run_mixer(args, rows)
    print(f"results: {write_results('bench_bidirectional', rows, info, args.out)}")
    print_table(rows, ["dtype", "shape", "provider", "fwd_ms", "fwdbwd_ms", "anchor_fwd", "anchor_fwdbwd",
                       "fwd_floor_frac", "fwdbwd_floor_frac", "peak_MB", "host_fwdbwd_ms", "graph_fwdbwd_ms", "error"])
