"""Timing of the CUDA selective scan (backend="cuda") next to the Triton backend on the SPEC section 7 shapes.

Providers: "cuda" (csrc/selective_scan, when matten_kernels.selective_scan.cuda.is_available()), "triton" (when the
Triton backend imports), "mamba_ssm" (when importable; it is not on the device machine, so the SPEC anchors are printed
instead). bf16, delta_softplus, D and delta_bias, no z (the anchors' setting); bidirectional = Vim v2 (every *_b given).
Medians of triton.testing.do_bench (CUDA events, warm-up first), in ms.

Cost model (forward, one direction): bytes = read u, delta + write out = 3 * batch*dim*L * 2 B (+ B, C, small);
exps = batch*dim*N*L (one exp per state per step). Floor = max(bytes / 3.0 TB/s, exps / 4e12 per s) (SPEC 7:
the H100 copy rate measured 3.0 TB/s; MUFU ex2 ~ 132 SMs * 16/clk * 1.98 GHz). The backward reads u, delta, B, C, dout
and writes du, ddelta (+ fp32 dB/dC partials) and evaluates two exps per state per step.

Usage: PYTHONPATH=. python benchmarks/bench_cuda_scan.py [--shapes global_xl,long] [--configs] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {  # name: (batch, dim, N, L), anchors (mamba-ssm CUDA, H100, SPEC 7): fwd, fwd+bwd, bi fwd, bi fwd+bwd
    "global_xl": ((2, 2304, 16, 4096), (0.330, 1.74, 0.847, 3.84)),
    "global_s": ((8, 768, 16, 4096), (0.426, 2.27, 1.10, 5.00)),
    "spatial_xl": ((32, 2304, 16, 256), (0.311, 1.86, 0.817, 4.09)),
    "temporal_xl": ((512, 2304, 16, 16), (4.92, 17.7, 10.0, 35.7)),
    "long": ((1, 2304, 16, 16384), (0.871, 3.77, 2.10, 8.12)),
    "global_xl_n8": ((2, 2304, 8, 4096), (float("nan"),) * 4),  # d_state 8 and 4: the 8-state lanes kernels
    "global_xl_n4": ((2, 2304, 4, 4096), (float("nan"),) * 4),
}


def floor_ms(batch, dim, N, L):
    bytes_ = 3 * batch * dim * L * 2
    return max(bytes_ / 3.0e12, batch * dim * N * L / 4e12) * 1e3


def make_inputs(batch, dim, N, L, bi, requires_grad):
    dev, dt = "cuda", torch.bfloat16

    def one():
        t = dict(u=torch.randn(batch, dim, L, device=dev, dtype=dt),
                 delta=(torch.randn(batch, dim, L, device=dev) * 0.5 - 1.0).to(dt),
                 A=-torch.rand(dim, N, device=dev) - 0.5,
                 B=torch.randn(batch, N, L, device=dev, dtype=dt), C=torch.randn(batch, N, L, device=dev, dtype=dt),
                 D=torch.randn(dim, device=dev), delta_bias=torch.randn(dim, device=dev) * 0.1)
        return {k: v.requires_grad_(requires_grad) for k, v in t.items()}

    x = one()
    if bi:
        x.update({k + "_b": v for k, v in one().items()})
    return x


def run_fn(backend, bi):
    from matten_kernels import bi_selective_scan, selective_scan

    def f(x):
        if bi:
            return bi_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], True,
                                     **{k: v for k, v in x.items() if k.endswith("_b")}, backend=backend)
        return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], True,
                              backend=backend)
    return f


def bench(backend, shape, bi, backward):
    from triton.testing import do_bench

    x = make_inputs(*shape, bi=bi, requires_grad=backward)
    f = run_fn(backend, bi)
    leaves = list(x.values())
    if backward:
        g = torch.randn(shape[0], shape[1], shape[3], device="cuda", dtype=torch.bfloat16)

        def step():
            torch.autograd.grad(f(x), leaves, g)
    else:
        def step():
            with torch.no_grad():
                f(x)
    return do_bench(step, warmup=25, rep=100, return_mode="median")


def providers():
    out = []
    from matten_kernels.selective_scan import cuda as cuda_mod

    if cuda_mod.is_available():
        out.append("cuda")
    try:
        from matten_kernels.selective_scan import _ops  # noqa: F401

        out.append("triton")
    except Exception as e:  # noqa: BLE001  (a missing or broken peer is reported, not fatal)
        print(f"triton backend not importable: {e!r}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--providers", default=None)
    ap.add_argument("--configs", action="store_true", help="also time the cuda kernel configurations for N=16")
    ap.add_argument("--budget_s", type=float, default=200.0, help="skip what would start after this many seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", default=None, help="run one cuda fwd+bwd on this shape and exit (for a profiler)")
    args = ap.parse_args()
    if args.once:
        x = make_inputs(*SHAPES[args.once][0], bi=False, requires_grad=True)
        out = run_fn("cuda", False)(x)
        torch.autograd.grad(out, list(x.values()), torch.ones_like(out))
        torch.cuda.synchronize()
        return
    t0 = time.time()
    provs = args.providers.split(",") if args.providers else providers()
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes.split(","):
        shape, anchor = SHAPES[name]
        for prov in provs:
            vals = []
            for bi, backward in ((False, False), (False, True), (True, False), (True, True)):
                if time.time() - t0 > args.budget_s:
                    vals.append(float("nan"))
                    continue
                try:
                    vals.append(bench(prov, shape, bi, backward))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {prov} bi={bi} bwd={backward}: {e!r}"[:400])
                    vals.append(float("nan"))
            rows.append(dict(shape=name, dims=shape, provider=prov, fwd=vals[0], fwd_bwd=vals[1], bi_fwd=vals[2],
                             bi_fwd_bwd=vals[3], anchor=anchor, floor_fwd=floor_ms(*shape)))
            torch.cuda.empty_cache()
    if args.configs and "cuda" in provs:
        import os

        from matten_kernels.selective_scan import cuda as cuda_mod

        # Variants: configuration 4 (8 threads x 2 states per channel) and the sequence split off/forced.
        for label, cfg, splits in (("cfg4", 4, None), ("nosplit", None, "1"), ("split4", None, "4")):
            for name in ("global_xl", "long", "global_s", "spatial_xl"):
                if time.time() - t0 > args.budget_s:
                    continue
                cuda_mod.config_override = cfg
                if splits:
                    os.environ["MATTEN_SCAN_SPLITS"] = splits
                try:
                    shape = SHAPES[name][0]
                    vals = [bench("cuda", shape, bi, bwd) for bi, bwd in ((False, False), (False, True))]
                    rows.append(dict(shape=name, dims=shape, provider=f"cuda-{label}", fwd=vals[0], fwd_bwd=vals[1],
                                     bi_fwd=float("nan"), bi_fwd_bwd=float("nan"), anchor=SHAPES[name][1],
                                     floor_fwd=floor_ms(*shape)))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} cuda-{label}: {e!r}"[:400])
                finally:
                    cuda_mod.config_override = None
                    os.environ.pop("MATTEN_SCAN_SPLITS", None)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(gpu=gpu, date=time.strftime("%Y-%m-%d %H:%M"), rows=rows), fh, indent=1)
    print(f"\n{gpu}; bf16, softplus, D, delta_bias; median ms (anchor = mamba-ssm CUDA from SPEC 7)")
    print(f"{'shape':12s} {'provider':11s} {'fwd':>7s} {'anchor':>7s} {'fwd+bwd':>8s} {'anchor':>7s} "
          f"{'bi fwd':>7s} {'anchor':>7s} {'bi f+b':>7s} {'anchor':>7s} {'floor':>6s}")
    for r in rows:
        a = r["anchor"]
        print(f"{r['shape']:12s} {r['provider']:11s} {r['fwd']:7.3f} {a[0]:7.3f} {r['fwd_bwd']:8.3f} {a[1]:7.2f} "
              f"{r['bi_fwd']:7.3f} {a[2]:7.3f} {r['bi_fwd_bwd']:7.3f} {a[3]:7.2f} {r['floor_fwd']:6.3f}")


if __name__ == "__main__":
    main()
