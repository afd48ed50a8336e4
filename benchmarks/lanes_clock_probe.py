"""Where the CUDA lanes kernels spend their cycles: SM clock per phase of a full window (device script, not a test).

Builds the extension with ``-DLANES_PROBE_CLOCK`` (a timing probe: each warp sums the cycles of every phase of its
full windows and writes them where dA / last_state would go, so those two are wrong in that build), runs one
unidirectional fwd+bwd per shape with the lanes forward, and prints the cycles a warp spends per window in each
phase (mean over warps), beside the probe build's fwd / fwd+bwd medians (to see how much the clock reads perturb).
The phases are sequential within a warp: their sum is the warp's time per window; the warps of an SM share its
issue slots, so a phase's cycles include the time other warps issue in it. With the shared-memory-scan backward
(the default since session 17) "state begin" is a group's maps, "state scan" both scans of a group, "replay" the
replay with its unpacking, and the two adjoint phases stay 0. The clock reads keep the compiler from overlapping the
phases (session 17: the probe build's forward took 0.300 ms against 0.232), so the shares are upper bounds for
phases the unrolled code overlaps.

Usage (device): PYTHONPATH=. python benchmarks/lanes_clock_probe.py --shapes global_xl,spatial_xl --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

FWD_PHASES = ("window begin", "state begin (unpack, exps, maps)", "state scan (shuffles)", "replay (h, y)",
              "window end (gate, store)")
BWD_PHASES = ("window begin (loads, softplus, dy)", "state begin (unpack, exps, maps)", "state scan (shuffles)",
              "replay (h, y)", "adjoint maps", "adjoint scan (shuffles)", "gradients", "dB/dC staged", "block barrier",
              "flush (vector reductions)", "window end (du, ddelta, dz)")
WINDOWS = 11  # the slot counting full windows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="global_xl,spatial_xl")
    ap.add_argument("--z", action="store_true", help="with the z gate")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ["MATTEN_SCAN_NVCC_FLAGS"] = (os.environ.get("MATTEN_SCAN_NVCC_FLAGS", "") + " -DLANES_PROBE_CLOCK").strip()
    os.environ.setdefault("MATTEN_SCAN_FWD_KERNEL", "1")  # the lanes forward (the seq one has no probe)

    import torch

    from benchmarks._scan_common import bench, env_info
    from benchmarks.bench_cuda_scan import SHAPES, make_inputs
    from matten_kernels import selective_scan
    from matten_kernels.selective_scan import cuda as cuda_mod

    cuda_mod._load()
    result = {"env": env_info(a.commit), "nvcc_flags": os.environ["MATTEN_SCAN_NVCC_FLAGS"], "rows": []}
    for name in a.shapes.split(","):
        batch, dim, N, L = SHAPES[name][0]
        x = make_inputs(batch, dim, N, L, bi=False, requires_grad=True)
        z = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16, requires_grad=True) if a.z else None
        leaves = list(x.values()) + ([z] if a.z else [])
        g = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)

        def call(last=False):
            return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], z, x["delta_bias"], True,
                                  return_last_state=last, backend="cuda")

        for _ in range(2):
            call().backward(g)
        for t in leaves:
            t.grad = None
        out, last = call(last=True)
        out.backward(g)
        torch.cuda.synchronize()
        fwd = last.detach().double().sum(dim=(0, 1))  # (16,): per phase, summed over warps
        bwd = x["A"].grad.double().sum(dim=0)
        row = {"shape": name, "z": a.z,
               "fwd_cycles_per_window": {p: round(float(fwd[k] / fwd[WINDOWS]), 1) for k, p in enumerate(FWD_PHASES)},
               "bwd_cycles_per_window": {p: round(float(bwd[k] / bwd[WINDOWS]), 1) for k, p in enumerate(BWD_PHASES)},
               "fwd_windows": float(fwd[WINDOWS]), "bwd_windows": float(bwd[WINDOWS])}
        with torch.no_grad():
            row["probe_fwd_ms"] = bench(call)
        row["probe_fwdbwd_ms"] = bench(lambda: call().backward(g), grad_to_none=leaves)
        result["rows"].append(row)
        print(f"== {name} (batch {batch}, dim {dim}, N {N}, L {L}), z={a.z}: probe build fwd {row['probe_fwd_ms']:.3f}"
              f" / fwd+bwd {row['probe_fwdbwd_ms']:.3f} ms", flush=True)
        for kind in ("fwd", "bwd"):
            d = row[f"{kind}_cycles_per_window"]
            tot = sum(d.values())
            print(f"  {kind}: {tot:.0f} cycles a warp per full window ({row[kind + '_windows']:.0f} windows)")
            for p, v in d.items():
                print(f"    {p:<38} {v:9.0f}  {100 * v / tot:5.1f}%")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"lanes-clock-probe-{result['env'].get('commit', 'x')}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
