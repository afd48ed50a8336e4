"""Host time of one selective-scan call on the GPU machine, per backend (device script, not a test).

At a shape whose kernels take a few microseconds, back-to-back calls with one synchronisation at the end run at the
speed of the host: the wall time per call is the Python, dispatch, autograd and allocation cost of the op. Timed for
the CUDA and Triton backends and mamba-ssm's ``selective_scan_fn`` (when importable), forward alone and fwd+bwd, uni
and bidirectional; then a cProfile of the CUDA backend's fwd+bwd (top entries by own time). Writes
``host_cuda_scan.json`` and ``host_cuda_scan_profile.txt`` under --out.

Usage: PYTHONPATH=. python benchmarks/host_cuda_scan.py [--mamba-build DIR] --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch


def per_call_ms(step, calls=200, rounds=5):
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return round(best, 4)


def main():
    from benchmarks._scan_common import mamba_provider
    from benchmarks.bench_cuda_scan import make_inputs, run_fn

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,64,16,256", help="batch,dim,N,L (small: host-bound)")
    ap.add_argument("--mamba-build", default=None)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("MATTEN_COMMIT", "unknown"),
           "shape": shape, "ms_per_call": {}}
    mamba, why = mamba_provider(args.mamba_build)
    g = torch.randn(shape[0], shape[1], shape[3], device="cuda", dtype=torch.bfloat16)
    for bi in (False, True):
        x = make_inputs(*shape, bi=bi, requires_grad=True)
        leaves = list(x.values())
        fns = {b: run_fn(b, bi) for b in ("cuda", "triton")}
        if mamba is not None and not bi:
            fns["mamba-ssm"] = lambda x: mamba(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"], True)
        for name, f in fns.items():
            key = f"{'bi ' if bi else ''}{name}"

            def fwd():
                with torch.no_grad():
                    f(x)

            def fwd_bwd():
                torch.autograd.grad(f(x), leaves, g, allow_unused=True)

            res["ms_per_call"][key] = {"fwd": per_call_ms(fwd), "fwd+bwd": per_call_ms(fwd_bwd)}
            print(key, res["ms_per_call"][key], flush=True)
    if mamba is None:
        res["mamba-ssm"] = why
    x = make_inputs(*shape, bi=False, requires_grad=True)
    leaves = list(x.values())
    f = run_fn("cuda", False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        torch.autograd.grad(f(x), leaves, g)
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_cuda_scan_profile.txt"), "w") as fh:
        fh.write(s.getvalue())
    print("\n".join(s.getvalue().splitlines()[:45]))
    with open(os.path.join(args.out, "host_cuda_scan.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
