"""Where the host time of an eager Matten-XL/2 v3 training step goes (GPU): cProfile over a few steps.

The eager step is host-bound (174 ms wall against ~147 ms replayed as a CUDA graph, `024e82e`), and the graphed step
is not available under DDP; this shows which Python functions and torch calls the host spends the step in.
Usage (device): PYTHONPATH=. python benchmarks/host_profile_model.py [--steps 3] [--backend auto]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from matten import create_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--top", type=int, default=45)
    args = p.parse_args()
    with torch.device("cuda"):
        model = create_model("Matten-XL/2", variant=3, kernel_backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cfg = model.matten_config
    x = torch.randn(2, cfg.in_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device="cuda")
    t = torch.randint(0, 1000, (2,), device="cuda")
    target = torch.randn(2, cfg.out_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t).sample
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"eager step without the profiler: {(time.perf_counter() - t0) / args.steps * 1e3:.1f} ms")
    print_host_profile(step, args.steps, args.top)


def print_host_profile(step, steps: int, top: int) -> None:
    """cProfile over `steps` calls of `step` (warmed up by the caller), the top functions by own and cumulative time."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    pr.disable()
    for key in ("tottime", "cumtime"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
