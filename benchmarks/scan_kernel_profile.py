"""Device time per kernel of one scan fwd+bwd (uni and bi, Vim v2 inputs with z), beside the do_bench medians.

Where a fwd+bwd is slower than its kernels suggest, this says which kernel (or which copy, reduction or fill around
them) takes the time. Written for the bidirectional CUDA scan at spatial XL, whose fwd+bwd (3.6 ms at `cf22127`) was
3.5x its unidirectional one (1.05 ms) for twice the work.
Usage (device): PYTHONPATH=. python benchmarks/scan_kernel_profile.py --shapes "spatial XL,global XL" \
    --backends cuda,triton --out $OUT [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from _scan_common import SHAPES, bench, env_info, scan_inputs
from matten_kernels import bi_selective_scan, selective_scan


def make_call(shape, bi, backend):
    batch, dim, N, L = shape
    f = scan_inputs(batch, dim, N, L, torch.bfloat16, seed=0, requires_grad=True)
    b = scan_inputs(batch, dim, N, L, torch.bfloat16, seed=1, requires_grad=True) if bi else {}
    z = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if bi:
        def call():
            return bi_selective_scan(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], z=z,
                                     delta_bias=f["delta_bias"], delta_softplus=True, u_b=b["u"], delta_b=b["delta"],
                                     A_b=b["A"], B_b=b["B"], C_b=b["C"], D_b=b["D"], delta_bias_b=b["delta_bias"],
                                     backend=backend)
    else:
        def call():
            return selective_scan(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], z=z,
                                  delta_bias=f["delta_bias"], delta_softplus=True, backend=backend)
    leaves = [*f.values(), *b.values(), z]
    return call, leaves, torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)


def kernel_times(call, dout, leaves=()):
    """Device us per kernel name of one ``call().backward(dout)`` (the leaves' grads reset first, so no accumulation
    kernels are counted)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        call().backward(dout)
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        call().backward(dout)
        torch.cuda.synchronize()
    rows = {}
    for e in p.key_averages():  # kernels carry self device time, the CPU-side ops that launch them none
        t = getattr(e, "self_device_time_total", 0)
        if t > 0:
            rows[e.key[:100]] = {"us": round(t, 1), "calls": e.count}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["us"]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="spatial XL,global XL")
    p.add_argument("--backends", default="cuda,triton")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    result = {"env": env_info(a.commit), "fwd_kernel_env": os.environ.get("MATTEN_SCAN_FWD_KERNEL"), "rows": []}
    for name in a.shapes.split(","):
        for backend in a.backends.split(","):
            for bi in (False, True):
                call, leaves, dout = make_call(SHAPES[name], bi, backend)
                kernels = kernel_times(call, dout, leaves)
                fwdbwd = bench(lambda: call().backward(dout), grad_to_none=leaves)
                with torch.no_grad():
                    fwd = bench(call)
                row = {"shape": name, "backend": backend, "bi": bi, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd,
                       "kernel_us_total": round(sum(k["us"] for k in kernels.values()), 1), "kernels": kernels}
                result["rows"].append(row)
                print(f"\n{name} {backend} {'bi' if bi else 'uni'}: fwd {fwd:.3f} ms, fwd+bwd {fwdbwd:.3f} ms, "
                      f"kernels of one fwd+bwd {row['kernel_us_total']:.0f} us", flush=True)
                for k, v in list(kernels.items())[:10]:
                    print(f"  {v['us']:9.1f} us  x{v['calls']:<3d} {k}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tag = os.environ.get("MATTEN_SCAN_FWD_KERNEL", "")
        path = os.path.join(a.out, f"scan-kernel-profile-{result['env']['gpu'].replace(' ', '-')}-"
                                   f"{result['env']['commit']}{'-fwd' + tag if tag else ''}.json")
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
