"""A/B of compile-time variants of the CUDA lanes kernels (device script, not a test).

Each variant is a set of nvcc -D flags (``MATTEN_SCAN_NVCC_FLAGS``): all variants are built in parallel (separate
extensions), then timed one after the other, each in its own process (the op namespace can be loaded once per
process), on the same GPU, with the default build first as the baseline. bf16, delta_softplus, D, delta_bias, no z.

Each variant's peak memory of one unidirectional fwd+bwd is measured per shape. Each variant is also checked against
the Triton backend (output and every gradient, bf16, L = 1000: full and partial windows); ``--bi`` adds the
bidirectional scan (timed and checked).

A variant's flags may start with ``src=DIR``: it is built from that copy of ``csrc/selective_scan``
(``MATTEN_SCAN_CSRC``), e.g. a revision's, ``git archive HEAD csrc/selective_scan | tar -x -C .ab/head``, carried to
the device in an ignored folder.

Usage: PYTHONPATH=. python benchmarks/cuda_lanes_variants.py --variants "base=;a2=-DLANES_AHEAD=2" [--bi] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = ("global_xl", "global_s", "spatial_xl", "long")


def check(bi):
    """Worst relative (Frobenius) error of the variant's output and gradients against the Triton backend, bf16, on a
    shape with full and partial windows: a variant that computes something else is reported, not timed as a win."""
    import torch

    from benchmarks.bench_cuda_scan import make_inputs, run_fn

    torch.manual_seed(0)
    x = make_inputs(2, 64, 16, 1000, bi=bi, requires_grad=True)
    leaves = list(x.values())
    worst = 0.0
    outs = {}
    for backend in ("cuda", "triton"):
        y = run_fn(backend, bi)(x)
        outs[backend] = [y] + list(torch.autograd.grad(y, leaves, torch.ones_like(y)))
    for a, b in zip(outs["cuda"], outs["triton"]):
        worst = max(worst, float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)))
    return worst


def peak_mb(shape):
    """Peak memory (MB) allocated by one unidirectional fwd+bwd beyond its inputs and cotangent."""
    import torch

    from benchmarks._scan_common import peak_mem_mb
    from benchmarks.bench_cuda_scan import make_inputs, run_fn

    x = make_inputs(*shape, bi=False, requires_grad=True)
    g = torch.randn(shape[0], shape[1], shape[3], device="cuda", dtype=torch.bfloat16)
    f, leaves = run_fn("cuda", False), list(x.values())
    return peak_mem_mb(lambda: torch.autograd.grad(f(x), leaves, g))


def child(shapes, bi):
    import torch

    from benchmarks.bench_cuda_scan import SHAPES as ALL, bench
    from matten_kernels.selective_scan import cuda as cuda_mod

    cuda_mod._load()
    res = {"gpu": torch.cuda.get_device_name(), "rel_err_vs_triton": check(False)}
    if bi:
        res["bi_rel_err_vs_triton"] = check(True)
    for name in shapes:
        shape = ALL[name][0]
        res[name] = [bench("cuda", shape, False, False), bench("cuda", shape, False, True)]
        res["peak_MB " + name] = round(peak_mb(shape), 1)
        if bi:
            res["bi " + name] = [bench("cuda", shape, True, False), bench("cuda", shape, True, True)]
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", required=True, help='"name=flags;name=flags" (flags may be empty)')
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=".")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--bi", action="store_true", help="also time the bidirectional scan (and check it)")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        child(shapes, args.bi)
        return
    variants = [v.split("=", 1) for v in args.variants.split(";") if v]
    env0 = dict(os.environ, MAX_JOBS=str(max(2, 16 // len(variants))))

    def env(flags):
        src = flags.split()[0][4:] if flags.startswith("src=") else ""
        return dict(env0, MATTEN_SCAN_NVCC_FLAGS=flags[4 + len(src):].strip() if src else flags,
                    MATTEN_SCAN_CSRC=os.path.abspath(src) if src else "")

    t0 = time.time()
    builds = [subprocess.Popen([sys.executable, "-c", "from matten_kernels.selective_scan import cuda; cuda._load()"],
                               env=env(flags)) for _, flags in variants]
    for b in builds:
        b.wait()
    print(f"built {len(variants)} variants in {time.time() - t0:.0f} s", flush=True)
    table = {}
    for name, flags in variants:
        r = subprocess.run([sys.executable, __file__, "--child", "--variants", "x", "--shapes", args.shapes]
                           + (["--bi"] if args.bi else []),
                           env=env(flags), capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        table[name] = json.loads(line[0][7:]) if line else {"error": r.stderr[-800:]}
        row = table[name]
        keys = shapes + (["bi " + s for s in shapes] if args.bi else [])
        print(f"{name:>10} {flags:<40} " + "  ".join(
            f"{s} {row[s][0]:.3f}/{row[s][1]:.3f}" if s in row else f"{s} -" for s in keys) +
            "  peak MB " + "/".join(str(row.get("peak_MB " + s, "-")) for s in shapes) +
            f"  err {row.get('rel_err_vs_triton', float('nan')):.1e}/{row.get('bi_rel_err_vs_triton', float('nan')):.1e}"
            + ("" if "error" not in row else " ERROR " + row["error"][-300:]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda_lanes_variants.json"), "w") as f:
        json.dump({"variants": dict(variants), "results": table}, f, indent=1)


if __name__ == "__main__":
    main()
