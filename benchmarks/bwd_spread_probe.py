"""Why the CUDA scan's fwd+bwd median moves between calls (device script, not a test).

The same shape timed twice in one process has given 1.21 and 1.54 ms (global XL, uni, CUDA lanes backward; NOTES
"Session 13"). Two suspects, timed here at the same build and shape:
  * fresh inputs per trial (what each benchmark call does): new tensors, new addresses for everything;
  * the same inputs, with a pad tensor of a different size allocated first, so that only the addresses of what the
    backward allocates (du, ddelta, the fp32 dB/dC it reduces into) move.
Each trial is a median of ``do_bench``; the spread within a trial (p10 / p90 of single runs) says whether a trial is
itself mixed. Writes ``bwd_spread_probe.json`` under --out.

Usage: PYTHONPATH=. python benchmarks/bwd_spread_probe.py --shapes global_xl,spatial_xl --trials 10 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def one_trial(step, reps=40):
    from triton.testing import do_bench

    med = do_bench(step, warmup=10, rep=60, return_mode="median")
    single = []
    for _ in range(reps):  # single runs, for the spread inside the trial
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        single.append(a.elapsed_time(b))
    single.sort()
    return {"median": round(med, 4), "p10": round(single[reps // 10], 4), "p90": round(single[reps * 9 // 10], 4)}


def main():
    from benchmarks.bench_cuda_scan import SHAPES, make_inputs, run_fn

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="global_xl,spatial_xl")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--bi", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    f = run_fn("cuda", args.bi)
    res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("MATTEN_COMMIT", "unknown")}
    for name in args.shapes.split(","):
        shape = SHAPES[name][0]
        g = torch.randn(shape[0], shape[1], shape[3], device="cuda", dtype=torch.bfloat16)
        fresh, shifted = [], []
        for _ in range(args.trials):
            x = make_inputs(*shape, bi=args.bi, requires_grad=True)
            leaves = list(x.values())
            fresh.append(one_trial(lambda: torch.autograd.grad(f(x), leaves, g)))
            del x, leaves
        x = make_inputs(*shape, bi=args.bi, requires_grad=True)
        leaves = list(x.values())
        for i in range(args.trials):
            pad = torch.empty(i * (1 << 20) + i * 12288, dtype=torch.uint8, device="cuda")
            shifted.append(one_trial(lambda: torch.autograd.grad(f(x), leaves, g)) | {"pad_bytes": pad.numel()})
            del pad
            torch.cuda.empty_cache()
        res[name] = {"fresh_inputs": fresh, "shifted_allocations": shifted}
        print(name, "fresh:", [t["median"] for t in fresh], flush=True)
        print(name, "shifted:", [t["median"] for t in shifted], flush=True)
        print(name, "p10/p90 fresh:", [(t["p10"], t["p90"]) for t in fresh], flush=True)
        del x, leaves
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bwd_spread_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
