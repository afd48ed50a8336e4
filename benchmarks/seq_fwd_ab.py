"""A/B of the CUDA backend's forward kernels for N <= 16 (device script, not a test): the lanes forward against the
seq forward (selective_scan_seq.cuh, 4 states per lane), in one process on one GPU, switched through
MATTEN_SCAN_FWD_KERNEL (read at every call). The backward is the lanes backward in every case.

Per shape: each variant's output (and, for the first shape, every gradient) against the lanes forward's, then fwd and
fwd+bwd medians (triton.testing.do_bench), uni and bidirectional (Vim v2 inputs); mamba-ssm's selective_scan_fn (its
CUDA extension, MATTEN_MAMBA_BUILD) in the same run when importable, and the Vim-style composition over it for the
bidirectional rows. bf16, delta_softplus, D and delta_bias, no z (the SPEC section 7 anchor setting).

Usage: PYTHONPATH=. python benchmarks/seq_fwd_ab.py [--shapes global_xl,global_s] [--rounds 2] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks._scan_common import env_info
from benchmarks.bench_cuda_scan import SHAPES, bench, make_inputs, run_fn

KERNELS = {"lanes": "1", "seq": "2"}


def rel_errs(shape, bi, grads):
    """Worst relative (Frobenius) difference of each seq variant's output (and gradients) from the lanes forward's."""
    torch.manual_seed(0)
    x = make_inputs(*shape, bi=bi, requires_grad=grads)
    leaves = list(x.values())
    res = {}
    for name, k in KERNELS.items():
        os.environ["MATTEN_SCAN_FWD_KERNEL"] = k
        y = run_fn("cuda", bi)(x)
        vals = [y] + (list(torch.autograd.grad(y, leaves, torch.ones_like(y))) if grads else [])
        res[name] = [v.detach().float() for v in vals]
    base = res.pop("lanes")
    return {name: max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(v, base))
            for name, v in res.items()}


def mamba_times(shape, bi):
    from triton.testing import do_bench

    from benchmarks import baselines

    if baselines._mamba_selective_scan_fn is None:
        return None
    x = make_inputs(*shape, bi=bi, requires_grad=True)
    leaves = list(x.values())

    def f():
        if bi:
            return baselines.vim_bi_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None,
                                                   x["delta_bias"], **{k: v for k, v in x.items() if k.endswith("_b")})
        return baselines.uni_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"])

    g = torch.randn(shape[0], shape[1], shape[3], device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            f()

    return [do_bench(fwd, warmup=25, rep=100, return_mode="median"),
            do_bench(lambda: torch.autograd.grad(f(), leaves, g), warmup=25, rep=100, return_mode="median")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="global_xl,global_s,spatial_xl,long")
    ap.add_argument("--dims", default="", help='extra shapes "b,d,N,L;b,d,N,L" (e.g. to place the default\'s threshold)')
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from matten_kernels.selective_scan import cuda as cuda_mod

    cuda_mod._load()
    cuda_mod.config_override = cuda_mod.LANES_CONFIG
    info = env_info()
    res = dict(info, rows=[], checks={})
    t0 = time.time()
    shapes = [(n, SHAPES[n][0]) for n in args.shapes.split(",") if n]
    shapes += [("x".join(d.split(",")), tuple(int(v) for v in d.split(","))) for d in args.dims.split(";") if d]
    for i, (name, shape) in enumerate(shapes):
        for bi in (False, True):
            key = ("bi " if bi else "") + name
            res["checks"][key] = rel_errs(shape, bi, grads=i == 0)
            print(f"check {key}: {res['checks'][key]}", flush=True)
        for r in range(args.rounds):
            for kname in args.kernels.split(","):
                os.environ["MATTEN_SCAN_FWD_KERNEL"] = KERNELS[kname]
                row = dict(shape=name, dims=shape, kernel=kname, round=r)
                for bi in (False, True):
                    p = "bi_" if bi else ""
                    row[p + "fwd"] = bench("cuda", shape, bi, False)
                    row[p + "fwd_bwd"] = bench("cuda", shape, bi, True)
                res["rows"].append(row)
                print(f"{name:10s} {kname:9s} r{r} fwd {row['fwd']:.4f} fwd+bwd {row['fwd_bwd']:.4f} "
                      f"bi fwd {row['bi_fwd']:.4f} bi fwd+bwd {row['bi_fwd_bwd']:.4f}  ({time.time() - t0:.0f} s)",
                      flush=True)
        os.environ.pop("MATTEN_SCAN_FWD_KERNEL", None)
        m = [mamba_times(shape, False), mamba_times(shape, True)]
        if m[0] is not None:
            res["rows"].append(dict(shape=name, dims=shape, kernel="mamba-ssm", fwd=m[0][0], fwd_bwd=m[0][1],
                                    bi_fwd=m[1][0], bi_fwd_bwd=m[1][1]))
            print(f"{name:10s} mamba-ssm fwd {m[0][0]:.4f} fwd+bwd {m[0][1]:.4f} vim-bi fwd {m[1][0]:.4f} "
                  f"fwd+bwd {m[1][1]:.4f}", flush=True)
        torch.cuda.empty_cache()
    path = os.path.join(args.out, f"seq-fwd-ab-{info['gpu'].replace(' ', '-')}-{info['commit']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
