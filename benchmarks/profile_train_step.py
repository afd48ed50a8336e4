"""Where a training step of a small Matten spends its time (GPU): data loading vs the step, host vs device.

Three measurements, printed and written as JSON:
  1. the DataLoader alone (clips/s with --num-workers workers), the same dataset the CLI trains on;
  2. the step alone (forward, loss, backward, clip, fused AdamW, EMA) on one batch already on the GPU: ms per step;
  3. torch.profiler over a few steps: device time per kernel (top 20) against the wall time of those steps.

Defaults are the embedded demo model's training set-up (docs/demo.md).
Usage (GPU): PYTHONPATH=. python benchmarks/profile_train_step.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time the step with torch.compile(model)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_train_step: needs a CUDA GPU")

    from matten import create_model
    from matten.data import SyntheticShapesDataset
    from matten.diffusion import GaussianDiffusion
    from matten.ema import EMA
    from matten.train import training_step

    device = torch.device("cuda")
    ds = SyntheticShapesDataset(num_frames=8, size=32, num_classes=4, length=2_000_000)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                         pin_memory=True, drop_last=True, persistent_workers=args.num_workers > 0)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        batch = next(it)
    data_rate = n * args.batch_size / (time.perf_counter() - t0)
    print(f"dataloader: {data_rate:.0f} clips/s ({args.num_workers} workers, batch {args.batch_size})", flush=True)

    model = create_model("Matten-T/2", depth=8, hidden_size=128, num_heads=4, patch_size=4, in_channels=3,
                         num_frames=8, sample_size=32, num_classes=4, learn_sigma=True).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=True)
    ema = EMA(model, decay=0.999)
    diffusion = GaussianDiffusion()
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = batch["video"].to(device)
    labels = batch["label"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step(net=model):
        losses = training_step(net, diffusion, x0, labels, gen, autocast=autocast)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, 1000)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    print(f"step alone: {step_ms:.2f} ms ({1e3 / step_ms:.1f} it/s, {args.batch_size * 1e3 / step_ms:.0f} clips/s)",
          flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    kernels = {}
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dev and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key] = (dev / 5 / 1e3, e.count / 5)
    total = sum(v[0] for v in kernels.values())
    print(f"profiled: wall {wall_ms:.2f} ms/step, device kernels {total:.2f} ms/step", flush=True)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    for name, (ms, count) in top:
        print(f"  {ms:7.3f} ms  x{count:5.0f}  {name[:110]}")
    cpu = sorted(((e.key, e.cpu_time_total / 5 / 1e3, e.count / 5) for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CPU), key=lambda r: -r[1])[:20]
    print("host (CPU total incl. children, ms/step):")
    for name, ms, count in cpu:
        print(f"  {ms:7.3f} ms  x{count:5.0f}  {name[:110]}")
    compiled_ms = None
    if args.compile:
        net = torch.compile(model)
        t0 = time.perf_counter()
        for _ in range(3):
            step(net)
        torch.cuda.synchronize()
        print(f"compile + 3 steps: {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(net)
        torch.cuda.synchronize()
        compiled_ms = (time.perf_counter() - t0) / args.steps * 1e3
        print(f"step with torch.compile(model): {compiled_ms:.2f} ms ({1e3 / compiled_ms:.1f} it/s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_train_step.json"), "w") as fh:
        json.dump(dict(gpu=torch.cuda.get_device_name(), batch=args.batch_size, data_clips_per_s=data_rate,
                       step_ms=step_ms, compiled_step_ms=compiled_ms, profiled_wall_ms=wall_ms, device_kernel_ms=total,
                       top_kernels=[(k, ms, c) for k, (ms, c) in top], top_host=cpu), fh, indent=1)


if __name__ == "__main__":
    main()
