"""A/B of compile-time variants of the CUDA lanes kernels (device script, not a test).

Each variant is a set of nvcc -D flags (``MATTEN_SCAN_NVCC_FLAGS``): all variants are built in parallel (separate
extensions), then timed one after the other, each in its own process (the op namespace can be loaded once per
process), on the same GPU, with the default build first as the baseline. bf16, delta_softplus, D, delta_bias, no z.

Usage: PYTHONPATH=. python benchmarks/cuda_lanes_variants.py --variants "base=;a2=-DLANES_AHEAD=2" --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = ("global_xl", "global_s", "spatial_xl", "long")


def child(shapes):
    import torch

    from benchmarks.bench_cuda_scan import SHAPES as ALL, bench
    from matten_kernels.selective_scan import cuda as cuda_mod

    cuda_mod._load()
    res = {"gpu": torch.cuda.get_device_name()}
    for name in shapes:
        shape = ALL[name][0]
        res[name] = [bench("cuda", shape, False, False), bench("cuda", shape, False, True)]
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", required=True, help='"name=flags;name=flags" (flags may be empty)')
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=".")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        child(shapes)
        return
    variants = [v.split("=", 1) for v in args.variants.split(";") if v]
    env0 = dict(os.environ, MAX_JOBS=str(max(2, 16 // len(variants))))
    t0 = time.time()
    builds = [subprocess.Popen([sys.executable, "-c", "from matten_kernels.selective_scan import cuda; cuda._load()"],
                               env=dict(env0, MATTEN_SCAN_NVCC_FLAGS=flags)) for _, flags in variants]
    for b in builds:
        b.wait()
    print(f"built {len(variants)} variants in {time.time() - t0:.0f} s", flush=True)
    table = {}
    for name, flags in variants:
        r = subprocess.run([sys.executable, __file__, "--child", "--variants", "x", "--shapes", args.shapes],
                           env=dict(env0, MATTEN_SCAN_NVCC_FLAGS=flags), capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        table[name] = json.loads(line[0][7:]) if line else {"error": r.stderr[-800:]}
        row = table[name]
        print(f"{name:>10} {flags:<40} " + "  ".join(
            f"{s} {row[s][0]:.3f}/{row[s][1]:.3f}" if s in row else f"{s} -" for s in shapes) +
            ("" if "error" not in row else " ERROR " + row["error"][-300:]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda_lanes_variants.json"), "w") as f:
        json.dump({"variants": dict(variants), "results": table}, f, indent=1)


if __name__ == "__main__":
    main()
