"""A/B in one run: BiMamba's fused core (conv + projections + bidirectional scan as one autograd node) against the
composition of the public ops (``fuse_core=False``), on the Triton and the CUDA scan backends.

* the mixer alone (batch 2, d_model 1152, bf16 module; 4096 tokens = global XL, ``--lengths``), both paths
  alternately for ``--rounds`` rounds: fwd and fwd+bwd medians (``triton.testing.do_bench``), the host time of
  one fwd+bwd (``host_ms``: issued from an idle GPU, not waited for), peak memory of fwd+bwd; at 4096 tokens also the Vim-style composition on the same weights
  (``baselines.VimBiMamba``: mamba-ssm's scan when ``MATTEN_MAMBA_BUILD`` or mamba_ssm provides it);
* the Matten-XL/2 v3 training step (batch 2, bf16 autocast, AdamW): eager and CUDA-graphed medians of timed steps
  (CUDA events), with every mixer of the model switched.

    PYTHONPATH=. python benchmarks/mixer_fused_ab.py [--lengths 1024,4096] [--rounds 2] [--steps 20] [--no-model]
        [--out DIR] [--commit SHA]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scan_common import bench, env_info, peak_mem_mb, write_results  # noqa: E402
from profile_model_step import events_median  # noqa: E402

from matten_kernels.modules import BiMamba  # noqa: E402


def backends():
    from matten_kernels.selective_scan import cuda as scan_cuda

    out = [("triton", None)]
    if scan_cuda.is_available():
        out.append(("cuda", "cuda"))
    else:
        print(f"[skip cuda scan] {scan_cuda._unavailable_reason()}")
    return out


def mixer_rows(lengths, rounds):
    """The mixer alone at each length (batch 2, d_model 1152, bf16): fused and composed alternately, ``rounds``
    times (run-to-run spread of the same configuration is ~0.2 ms at 4096 tokens on the device machine)."""
    rows = []
    for L in lengths:
        b, d = 2, 1152
        m = BiMamba(d, d_state=16, bimamba="v2").cuda().to(torch.bfloat16)
        h = torch.randn(b, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(h)
        leaves = [h] + list(m.parameters())

        def fb():
            m(h).backward(g)

        for name, backend in backends():
            for rnd in range(rounds):
                for fused in (True, False):
                    m.backend, m.fuse_core = backend, fused
                    with torch.no_grad():
                        fwd = bench(lambda: m(h))
                    rows.append(dict(case=f"mixer {L} tokens", scan=name, fused=fused, round=rnd,
                                     fwd_ms=round(fwd, 4), fwdbwd_ms=round(bench(fb, grad_to_none=leaves), 4),
                                     host_ms=_host_ms(fb), peak_MB=round(peak_mem_mb(fb), 1)))
                    print(rows[-1], flush=True)
        m.backend, m.fuse_core = None, True
        if L != 4096:
            continue
        try:  # the baseline, same weights: Vim's composition (flips, two scans; mamba-ssm's when importable)
            from baselines import SCAN_PROVIDER, VimBiMamba

            vim = VimBiMamba(m)
            with torch.no_grad():
                fwd = bench(lambda: vim(h))

            def fb_vim():
                vim(h).backward(g)

            rows.append(dict(case=f"mixer {L} tokens", scan=f"Vim-style ({SCAN_PROVIDER})", fused=None,
                             fwd_ms=round(fwd, 4), fwdbwd_ms=round(bench(fb_vim, grad_to_none=leaves), 4),
                             peak_MB=round(peak_mem_mb(fb_vim), 1)))
            print(rows[-1], flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[skip Vim-style baseline] {type(e).__name__}: {e}")
    return rows


def _host_ms(fn, iters=20):
    """Median host time of one call (from the idle GPU: synchronised before, not after): the Python, dispatcher and
    launch work, which the GPU waits for when it is shorter than its own work."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return round(statistics.median(times), 3)


def model_rows(steps):
    from matten import create_model
    from matten.cuda_graph import CUDAGraphTrainStep

    with torch.device("cuda"):
        model = create_model("Matten-XL/2", variant=3)
    with torch.no_grad():  # as bench_model: no zero-initialised gate or layer left
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    cfg = model.matten_config
    x = torch.randn(2, cfg.in_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device="cuda")
    t = torch.randint(0, 1000, (2,), device="cuda")
    target = torch.randn(2, cfg.out_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    mixers = [m for m in model.modules() if isinstance(m, BiMamba)]
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def eager():
        with autocast():
            loss = F.mse_loss(model(x, t).sample.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    for name, backend in backends():
        for fused in (True, False):
            for m in mixers:
                m.backend, m.fuse_core = backend, fused
            row = dict(case="Matten-XL/2 v3 train step", scan=name, fused=fused, mixers=len(mixers),
                       eager_ms=round(events_median(eager, 3, steps), 2))
            graphed = CUDAGraphTrainStep(model.parameters(),
                                         lambda x, t, target: {"loss": F.mse_loss(model(x, t).sample.float(), target)})

            def graph_step():
                with autocast():
                    graphed(x, t, target)
                opt.step()
                opt.zero_grad(set_to_none=True)

            row["graphed_ms"] = round(events_median(graph_step, 3, steps), 2)
            del graphed
            torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--lengths", default="4096", help="mixer token counts, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    info = env_info(args.commit)
    print(info)
    rows = mixer_rows([int(v) for v in args.lengths.split(",")], args.rounds)
    if not args.no_model:
        rows += model_rows(args.steps)
    path = write_results("mixer-fused-ab", rows, info, args.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
