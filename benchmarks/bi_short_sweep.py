"""The bidirectional Triton scan at short global lengths: kernel times per length, and the backward's segment count.

The crossover run at e23b3d6 had our bi scan (Vim v2 inputs, z, batch 2, d_inner 2304, N 16, bf16) at 1024 tokens
slower than Vim's composition over mamba-ssm in fwd+bwd (1.60 vs 1.12 ms) with the forwards equal (0.26 / 0.27 ms),
though faster from 2048 tokens on. This prints (1) the device time per kernel of one fwd+bwd at 1024, 2048 and 4096
tokens, (2) the backward launcher's time at 1024 and 2048 tokens for segment counts 1 .. n_saves (the default from
``scan_config`` marked), and writes them as JSON.
Usage (device): PYTHONPATH=. python benchmarks/bi_short_sweep.py --out $OUT [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import scan_kernel_profile
from _scan_common import bench, env_info, scan_inputs
from matten_kernels import bi_selective_scan
from matten_kernels.selective_scan.triton_bwd import selective_scan_bwd
from matten_kernels.selective_scan.triton_fwd import scan_config, selective_scan_fwd

BATCH, DIM, N = 2, 2304, 16


def v2_inputs(L, seed=0):
    f = scan_inputs(BATCH, DIM, N, L, torch.bfloat16, seed=seed, requires_grad=True)
    b = scan_inputs(BATCH, DIM, N, L, torch.bfloat16, seed=seed + 1, requires_grad=True)
    z = torch.randn(BATCH, DIM, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return f, b, z


def call(f, b, z):
    return bi_selective_scan(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], z=z, delta_bias=f["delta_bias"],
                             delta_softplus=True, u_b=b["u"], delta_b=b["delta"], A_b=b["A"], B_b=b["B"], C_b=b["C"],
                             D_b=b["D"], delta_bias_b=b["delta_bias"], backend="triton")


def kernel_times(L):
    f, b, z = v2_inputs(L)
    dout = torch.randn(BATCH, DIM, L, device="cuda", dtype=torch.bfloat16)
    leaves = [f[k] for k in f] + [b[k] for k in b] + [z]
    rows = scan_kernel_profile.kernel_times(lambda: call(f, b, z), dout, leaves)
    fwdbwd = bench(lambda: call(f, b, z).backward(dout), grad_to_none=leaves)
    with torch.no_grad():
        fwd = bench(lambda: call(f, b, z))
    return {"L": L, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "kernels": rows}


def segment_sweep(L):
    f, b, z = v2_inputs(L)
    u, dl = f["u"].detach(), f["delta"].detach()
    kw = dict(u_b=b["u"].detach(), delta_b=b["delta"].detach(), A_b=b["A"].detach(), B_b=b["B"].detach(),
              C_b=b["C"].detach(), D_b=b["D"].detach(), delta_bias_b=b["delta_bias"].detach())
    A, B, C, D, bias = (f[k].detach() for k in ("A", "B", "C", "D", "delta_bias"))
    zz = z.detach()
    with torch.no_grad():
        _, _, states, states_b = selective_scan_fwd(u, dl, A, B, C, D, zz, bias, None, True, bidirectional=True, **kw)
    dout = torch.randn(BATCH, DIM, L, device="cuda", dtype=torch.bfloat16)
    default = scan_config(BATCH, DIM, N, L, torch.bfloat16, (1, 1, 1, 1), 0, backward=True, bidirectional=True)
    n_saves = states.shape[2]
    out = {"L": L, "default": list(default), "n_saves": n_saves, "bwd_ms": {}}
    n = 1
    while n <= n_saves:
        cfg = default[:5] + (n,)
        out["bwd_ms"][n] = bench(lambda: selective_scan_bwd(dout, None, u, dl, A, B, C, D, zz, bias, None, states,
                                                            True, states_b=states_b, bidirectional=True, config=cfg,
                                                            **kw))
        n *= 2
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--commit", default=os.environ.get("MATTEN_COMMIT", "unknown"))
    p.add_argument("--out", default=".")
    args = p.parse_args()
    res = {"env": env_info(args.commit), "kernels": [], "sweep": []}
    for L in (1024, 2048, 4096):
        r = kernel_times(L)
        res["kernels"].append(r)
        print(f"L {L}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwdbwd_ms']:.3f} ms")
        for k, v in list(r["kernels"].items())[:8]:
            print(f"    {v['us']:9.1f} us  x{v['calls']}  {k}")
    for L in (1024, 2048):
        r = segment_sweep(L)
        res["sweep"].append(r)
        print(f"L {L}: default config {r['default']} (n_saves {r['n_saves']}); backward ms by segment count: "
              + ", ".join(f"{k}: {v:.3f}" for k, v in r["bwd_ms"].items()))
    gpu = res["env"].get("gpu", "gpu").replace(" ", "-")
    with open(os.path.join(args.out, f"bi-short-sweep-{gpu}-{args.commit}.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
