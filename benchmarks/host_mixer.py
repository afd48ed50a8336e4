"""Host time of one BiMamba mixer call on the GPU machine (device script, not a test).

At a shape whose kernels take a few microseconds, back-to-back calls with one synchronisation at the end run at the
speed of the host. Times the mixer's forward and fwd+bwd per scan backend (Triton, CUDA) and Vim's composition
(``baselines.VimBiMamba``), then a cProfile of each backend's fwd+bwd (top entries by own time). At global XL the
mixer's eager fwd+bwd took 4.5-5.7 ms of host time for 3.7 ms of device time (``bench_bidirectional.py
--cudagraph``, f52c92c): its eager medians are the host's. Writes ``host_mixer.json`` and
``host_mixer_profile_<backend>.txt`` under --out. ``--torch-profile`` adds a torch.profiler table per backend (host time
of every aten op and CUDA runtime call, kernels counted: ``host_mixer_torchprof_<backend>.txt``): the cProfile shows
the Python, this shows what the host spends inside torch and the driver (a launch, an allocation, a synchronisation).

Usage: PYTHONPATH=. python benchmarks/host_mixer.py [--shape 2,4096,1152] [--torch-profile] [--mamba-build DIR] --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys

import torch

from benchmarks.host_cuda_scan import per_call_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,256,128", help="batch,L,d_model (small: host-bound)")
    ap.add_argument("--mamba-build", default=None)
    ap.add_argument("--out", default=".")
    ap.add_argument("--torch-profile", action="store_true", help="also a torch.profiler table per backend")
    args = ap.parse_args()
    if args.mamba_build:
        os.environ.setdefault("MATTEN_MAMBA_BUILD", args.mamba_build)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from baselines import SCAN_PROVIDER, VimBiMamba

    from matten_kernels.modules import BiMamba

    batch, L, d = (int(v) for v in args.shape.split(","))
    m = BiMamba(d, d_state=16, bimamba="v2").cuda().to(torch.bfloat16)
    h = torch.randn(batch, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(h)
    leaves = [h] + list(m.parameters())
    res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("MATTEN_COMMIT", "unknown"),
           "shape": (batch, L, d), "vim_scan": SCAN_PROVIDER, "ms_per_call": {}}
    runs = {"triton": (m, "triton"), "cuda": (m, "cuda"), "vim": (VimBiMamba(m), None)}
    for name, (mod, backend) in runs.items():
        m.backend = backend

        def fwd():
            with torch.no_grad():
                mod(h)

        def fwd_bwd():
            torch.autograd.grad(mod(h), leaves, g, allow_unused=True)

        res["ms_per_call"][name] = {"fwd": per_call_ms(fwd, calls=100), "fwd+bwd": per_call_ms(fwd_bwd, calls=100)}
        print(name, res["ms_per_call"][name], flush=True)
        if backend is None:
            continue
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fwd_bwd()
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(40)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"host_mixer_profile_{name}.txt"), "w") as fh:
            fh.write(s.getvalue())
        print("\n".join(s.getvalue().splitlines()[:40]))
        if args.torch_profile:
            torch_profile(fwd_bwd, os.path.join(args.out, f"host_mixer_torchprof_{name}.txt"))
    m.backend = None
    with open(os.path.join(args.out, "host_mixer.json"), "w") as fh:
        json.dump(res, fh, indent=1)


def torch_profile(step, path, calls=5):
    """torch.profiler over `calls` fwd+bwd: ops by host (self CPU) time, with the count of kernels a call."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / calls
    table = events.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=60)
    text = f"{calls} calls; kernels a call: {kernels:.1f}\n{table}"
    with open(path, "w") as fh:
        fh.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
