"""Where a Matten-XL/2 training step spends its device time, per scan backend (GPU; one run, both backends).

The op-level benchmarks put the CUDA scan 1.77 ms ahead of the Triton scan per BiMamba mixer fwd+bwd (14 global
mixers in Matten-XL/2 v3: ~25 ms), but the model's training step differed by 2 ms (`bench_model.py`). This script
measures, for each ``kernel_backend``:
  1. the training step as bench_model times it (bf16 autocast, fp32 master weights, fused AdamW): median of CUDA events;
  2. one global mixer of the model on its own under the same autocast, fwd+bwd;
  3. torch.profiler over two steps: device time per kernel, grouped (scan, conv, attention, GEMM, other);
  4. what the model hands to ``bi_selective_scan`` (shapes, strides, dtypes of the first call).
Usage (device): PYTHONPATH=. python benchmarks/profile_model_step.py --out $OUT [--backends auto,cuda] [--commit C]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from collections import defaultdict

import torch
import torch.nn.functional as F

GROUPS = [  # (group, regex on the kernel name), first match wins
    ("adaln", r"ln_modulate|gated_residual"),
    ("scan", r"selective|scan|lanes|_bi_|summary"),
    ("conv", r"conv1d|dwconv|depthwise"),
    ("attention", r"attn|attention|flash|fmha"),
    ("gemm", r"gemm|cutlass|sm90_|nvjet|cublas|xmma"),
    ("norm/elementwise", r"elementwise|vectorized|reduce|norm|softmax|copy|cat|fill|adam|foreach"),
]


def group_of(name: str) -> str:
    for g, rx in GROUPS:
        if re.search(rx, name, re.IGNORECASE):
            return g
    return "other"


def events_median(fn, warmup=2, iters=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def describe(t):
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return f"{tuple(t.shape)} {str(t.dtype)[6:]} stride {t.stride()}"


def run_backend(backend: str, batch: int = 2) -> dict:
    from matten import create_model
    import matten_kernels.modules.bimamba as bimamba_mod

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = create_model("Matten-XL/2", variant=3, kernel_backend=backend)
    with torch.no_grad():  # as bench_model: no adaLN-Zero identities
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    cfg = model.matten_config
    x = torch.randn(batch, cfg.in_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    target = torch.randn(batch, cfg.out_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t).sample
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seen = {}
    inner = bimamba_mod.bi_selective_scan

    def spy(*args, **kw):
        if not seen:
            names = ["u", "delta", "A", "B", "C", "D"]
            seen.update({n: describe(a) for n, a in zip(names, args)})
            seen.update({k: describe(v) for k, v in kw.items()})
        return inner(*args, **kw)

    bimamba_mod.bi_selective_scan = spy
    try:
        step_ms = events_median(train_step)
    finally:
        bimamba_mod.bi_selective_scan = inner

    mixers = [b.mixer for b in model.blocks if hasattr(b, "mixer") and getattr(b, "axis", "global") == "global"]
    mixer = mixers[0]
    h = torch.randn(batch, cfg.num_frames * cfg.tokens_per_frame, cfg.hidden_size, device="cuda", requires_grad=True)

    def mixer_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mixer(h)
        y.float().sum().backward()

    mixer_ms = events_median(mixer_step, warmup=3, iters=20)

    from torch.profiler import ProfilerActivity, profile
    steps = 2
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name][0] += ev.device_time / 1e3 / steps  # ms per step
            per_kernel[ev.name][1] += 1
    groups = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        groups[group_of(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:30]
    row = dict(backend=backend, train_step_ms=round(step_ms, 2), global_mixer_fwdbwd_ms=round(mixer_ms, 3),
               n_global_mixers=len(mixers), device_ms_per_step=round(sum(groups.values()), 2),
               groups_ms={g: round(v, 2) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
               top_kernels=[dict(name=n[:120], ms=round(v[0], 3), calls_per_step=v[1] // steps) for n, v in top],
               scan_args=seen)
    del model, opt
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="auto,cuda")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_model_step: needs a CUDA GPU")
    rows = []
    for backend in args.backends.split(","):
        row = run_backend(backend)
        rows.append(row)
        print(f"== kernel_backend={backend}: train step {row['train_step_ms']} ms, device {row['device_ms_per_step']} "
              f"ms/step, one global mixer fwd+bwd (autocast) {row['global_mixer_fwdbwd_ms']} ms "
              f"x {row['n_global_mixers']}", flush=True)
        print("   groups:", row["groups_ms"])
        print("   scan args:", row["scan_args"])
        for k in row["top_kernels"][:20]:
            print(f"   {k['ms']:8.3f} ms  x{k['calls_per_step']:<4d} {k['name'][:100]}")
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    with open(os.path.join(args.out, f"profile-model-step-{gpu}-{args.commit}.json"), "w") as fh:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=args.commit, rows=rows), fh,
                  indent=1)


if __name__ == "__main__":
    main()
