"""Model-level benchmark: Matten-XL/2 variants 1-4 vs Latte-XL/2, and our kernels vs the ops users would otherwise use.

Shape: latent video (batch 2, C 4, F 16, 32 x 32), i.e. 16 frames of 256 x 256 through the SD VAE; 4096 tokens per
clip; bf16 autocast (fp32 master weights); every model from the same code (matten.model) and the same kernels.

What is timed (CUDA events around each call, median of ``ITERS`` after ``WARMUP`` calls):
  train step   forward, MSE loss against a random target, backward, fused AdamW step, zero_grad (set_to_none);
               also with forward + loss + backward replayed as a CUDA graph (``matten.cuda_graph.CUDAGraphTrainStep``,
               as ``matten train --cuda-graph`` runs it; AdamW eager): ``train_graph``.
  sample step  one forward under torch.no_grad (one denoising step at batch 2, no classifier-free guidance);
               also replayed as a CUDA graph (``matten.cuda_graph``, as ``matten sample`` runs it): ``sample_graph``.
Peak memory: torch.cuda.max_memory_allocated over one call after warm-up (weights, grads and AdamW state included
for the train step). Weights: the model's own init, except that the parameters adaLN-Zero leaves at 0 (gates, final
layer) are drawn from N(0, 0.02), so every block does real work on non-zero data. The baseline case first checks
that the swapped-in ops compute the same function (relative error of one forward, recorded as baseline_rel_err).

Cases, in the order they run (the most important first, so a short budget still answers the issue's questions):
  v3 ours, v3 baselines (benchmarks/baselines.py: Vim-style bi-Mamba from a unidirectional scan with flips and
  F.conv1d; SDPA attention with rearranges; the same weights), Latte, v1, v2, v4, and v3 with kernel_backend="ref"
  (sample step only, one call: the reference scan loops in Python over 4096 tokens x 14 blocks x 2 directions; its
  training step would keep every step's state for autograd, tens of GB, so it is not run), v3 with the CUDA scan
  backend, and v3 under torch.compile (its warm-up calls include the compilation).
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from baselines import SCAN_PROVIDER, swap_in_baselines

BATCH = 2
WARMUP, ITERS = 2, 5
# (label, variant, kernel_backend, baselines swapped in, run the train step)
CASES = [
    ("Matten-XL/2 v3", 3, "auto", False, True),
    ("Matten-XL/2 v3 baselines", 3, "auto", True, True),
    ("Latte-XL/2", "latte", "auto", False, True),
    ("Matten-XL/2 v1", 1, "auto", False, True),
    ("Matten-XL/2 v2", 2, "auto", False, True),
    ("Matten-XL/2 v4", 4, "auto", False, True),
    ("Matten-XL/2 v3 ref", 3, "ref", False, False),
    ("Matten-XL/2 v3 cuda", 3, "cuda", False, True),  # the scan through the CUDA C++ backend
    # every op on Triton: what "auto" runs unless the CUDA scan was installed ahead of time (then auto takes it for
    # the spatial and global blocks, Triton for the temporal ones)
    ("Matten-XL/2 v3 triton", 3, "triton", False, True),
    # torch.compile of the model (`matten train --compile`): fewer launches for the host-bound eager step; our ops
    # stay opaque custom ops inside the compiled graph
    ("Matten-XL/2 v3 compiled", 3, "auto", False, True),
    ("Matten-XL/2 v3 cuda compiled", 3, "cuda", False, True),
]


def _free(ctx):
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _autocast(ctx):
    if ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def run_case(ctx, label, variant, backend, baselines, train):  # noqa: C901
    from matten import create_model
    from matten.flops import count_flops

    preset = "Matten-T/2" if ctx.smoke else "Matten-XL/2"
    small = {"num_frames": 4, "sample_size": 8} if ctx.smoke else {}  # smoke: 64 tokens, the ref scan stays quick
    warmup, iters = (1, 1) if ctx.smoke else (WARMUP, ITERS)
    t0 = time.monotonic()
    with torch.device(ctx.device):
        model = create_model(preset, variant=variant, kernel_backend=backend, **small)
    with torch.no_grad():  # adaLN-Zero leaves gates and the final layer at 0: fill them so no block is an identity,
        for p in model.parameters():  # no output is trivially 0, and no matmul runs on zeros (faster than real data)
            if not p.any():
                p.normal_(0.0, 0.02)
    cfg = model.matten_config
    x = torch.randn(BATCH, cfg.in_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size, device=ctx.device)
    t = torch.randint(0, 1000, (BATCH,), device=ctx.device)
    target = torch.randn(BATCH, cfg.out_channels, cfg.num_frames, cfg.sample_size, cfg.sample_size,
                         device=ctx.device)
    fwd_flops = count_flops(model, batch=BATCH).total
    row = {"preset": preset, "variant": variant, "kernel_backend": backend, "baselines": baselines,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "fwd_GFLOPs": fwd_flops / 1e9,
           "build_s": time.monotonic() - t0}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=ctx.device.type == "cuda")
    run = torch.compile(model) if label.endswith(" compiled") else model  # the same parameters either way

    def train_step():
        with _autocast(ctx):
            out = run(x, t).sample
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_step():
        with torch.no_grad(), _autocast(ctx):
            return run(x, t).sample

    if label.endswith("v3"):  # FlopCounterMode vs the analytic count, this torch
        row["flop_counter"] = flop_counter_check(model, x, t)
    if baselines:  # the baseline must compute the same function: compare one forward before timing it
        with torch.no_grad(), _autocast(ctx):
            ref_out = model(x, t).sample.float()
            with swap_in_baselines(model):
                base_out = model(x, t).sample.float()
        row["baseline_rel_err"] = float((base_out - ref_out).norm() / ref_out.norm().clamp_min(1e-30))
        del ref_out, base_out
    swap = swap_in_baselines(model) if baselines else _nullcontext()
    with swap:
        if train:
            t1 = time.monotonic()
            row["train"] = ctx.time_steps(train_step, warmup=warmup, iters=iters)
            row["train"]["peak_GiB"] = _gib(ctx.peak_memory(train_step))
            row["train"]["wall_s"] = time.monotonic() - t1
            # fwd + bwd ~ 3x the forward FLOPs (the optimizer step is elementwise)
            row["train"]["model_TFLOPs"] = 3 * fwd_flops / (row["train"]["median_ms"] * 1e-3) / 1e12
            if ctx.device.type == "cuda":  # the compiled model too: its kernels replayed without the host
                row["train_graph"] = time_graphed_train_step(ctx, run, model.parameters(), opt, x, t, target,
                                                             warmup, iters)
        else:
            row["train"] = {"skipped": "reference scan: autograd would keep every step's state (tens of GB); "
                                       "sample step timed once instead"}
        opt.state.clear()
        _free(ctx)
        t1 = time.monotonic()
        if backend == "ref":
            row["sample"] = ctx.time_steps(sample_step, warmup=0, iters=1)
        else:
            row["sample"] = ctx.time_steps(sample_step, warmup=warmup, iters=iters)
        row["sample"]["peak_GiB"] = _gib(ctx.peak_memory(sample_step)) if backend != "ref" else None
        row["sample"]["wall_s"] = time.monotonic() - t1
        row["sample"]["model_TFLOPs"] = fwd_flops / (row["sample"]["median_ms"] * 1e-3) / 1e12
        if ctx.device.type == "cuda" and backend != "ref":  # replayed as a CUDA graph (no host cost)
            from matten.cuda_graph import CUDAGraphForward

            graphed = CUDAGraphForward(run)

            def graph_step():
                with _autocast(ctx):
                    return graphed(x, t)

            try:
                row["sample_graph"] = ctx.time_steps(graph_step, warmup=warmup, iters=iters)
            except RuntimeError as e:
                row["sample_graph"] = {"error": str(e)[:300]}
            del graphed
    del model, opt
    _free(ctx)
    return row


def time_graphed_train_step(ctx, run, params, opt, x, t, target, warmup, iters):
    """The train step with forward + loss + backward of ``run`` (the model or its compiled wrapper) replayed as one
    CUDA graph, the optimizer eager. Memory: what the allocator holds afterwards (weights, AdamW state, the graph's
    pool and gradient buffers); max_memory_allocated would miss the pool's freed blocks."""
    from matten.cuda_graph import CUDAGraphTrainStep

    _free(ctx)
    graphed = CUDAGraphTrainStep(params, lambda x, t, target: {"loss": F.mse_loss(run(x, t).sample.float(), target)})

    def step():
        with _autocast(ctx):
            graphed(x, t, target)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        t0 = time.monotonic()
        res = ctx.time_steps(step, warmup=warmup, iters=iters)
        res["reserved_GiB"] = _gib(torch.cuda.memory_reserved(x.device))
        res["wall_s"] = time.monotonic() - t0
    except RuntimeError as e:
        res = {"error": str(e)[:300]}
    del graphed
    _free(ctx)
    return res


def flop_counter_check(model, x, t):
    """One forward under torch.utils.flop_counter.FlopCounterMode (matten's op formulas registered) beside the
    analytic count of the same work (``counted_by_torch``) and the analytic total (elementwise work included)."""
    from torch.utils.flop_counter import FlopCounterMode

    from matten.flops import count_flops, register_flop_formulas

    register_flop_formulas()
    with torch.no_grad(), _autocast_for(x), FlopCounterMode(display=False) as fc:
        model(x, t)
    report = count_flops(model, batch=x.shape[0])
    by_op = {str(k): v for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return {"counter": fc.get_total_flops(), "analytic_counted_by_torch": report.counted_by_torch,
            "analytic_total": report.total, "by_op": by_op, "torch": torch.__version__}


def _autocast_for(x):
    if x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _gib(n):
    return None if n is None else n / 2 ** 30


def run(ctx, save):
    res = {"batch": BATCH, "dtype": "bf16 autocast" if ctx.device.type == "cuda" else "fp32 (smoke)",
           "scan_provider": SCAN_PROVIDER, "warmup": WARMUP, "iters": ITERS, "cases": {}}
    for label, variant, backend, baselines, train in CASES:
        if ctx.cases and label not in ctx.cases:
            continue
        if ctx.quick and (variant not in (3, "latte") or backend == "ref" or label.endswith(" compiled")):
            res["cases"][label] = {"skipped": "--quick"}
            continue
        # the reference case needs ~1 minute of headroom (one slow forward), the compiled one its compilation (a few
        # minutes for XL): skip them rather than blow the budget
        need = 0 if ctx.smoke else 60 if backend == "ref" else 240 if label.endswith(" compiled") else 0
        if ctx.time_left() <= need:
            res["cases"][label] = {"skipped": "time budget"}
            continue
        try:
            res["cases"][label] = run_case(ctx, label, variant, backend, baselines, train)
        except torch.cuda.OutOfMemoryError as e:
            res["cases"][label] = {"error": f"OOM: {str(e).splitlines()[0]}"}
            _free(ctx)
        except Exception as e:  # record and go on: one broken case must not hide the others
            res["cases"][label] = {"error": f"{type(e).__name__}: {e}"}
            _free(ctx)
        save(res)
    ours, base = res["cases"].get("Matten-XL/2 v3", {}), res["cases"].get("Matten-XL/2 v3 baselines", {})
    res["speedup_vs_baselines"] = {
        mode: (base[mode]["median_ms"] / ours[mode]["median_ms"])
        if "median_ms" in ours.get(mode, {}) and "median_ms" in base.get(mode, {}) else None
        for mode in ("train", "train_graph", "sample", "sample_graph")}
    # the step a user of matten runs (graphed) against the step the same model built from the usual ops runs (eager)
    res["graphed_vs_eager_baselines"] = {
        label: base["train"]["median_ms"] / row["train_graph"]["median_ms"]
        for label, row in res["cases"].items()
        if "median_ms" in row.get("train_graph", {}) and "median_ms" in base.get("train", {}) and "baselines" not in label}
    ref = res["cases"].get("Matten-XL/2 v3 ref", {})
    res["speedup_vs_ref_sample"] = (ref["sample"]["median_ms"] / ours["sample"]["median_ms"]
                                    if "median_ms" in ref.get("sample", {}) and "median_ms" in ours.get("sample", {})
                                    else None)
    return res


def summarize(section, res):
    lines = [f"## model step (batch {res['batch']}, {res['dtype']}; baselines' scan: {res['scan_provider']})",
             "| case | params M | train ms | train peak GiB | train TFLOP/s | train ms (CUDA graph) | sample ms | "
             "sample peak GiB | sample ms (CUDA graph) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(d, k, spec):
        v = d.get(k) if isinstance(d, dict) else None
        return spec.format(v) if v is not None else "-"

    for label, row in res["cases"].items():
        if "error" in row or "skipped" in row:
            lines.append(f"| {label} | {row.get('error') or row.get('skipped')} |||||||")
            continue
        tr, sa = row.get("train", {}), row.get("sample", {})
        lines.append(f"| {label} | {row['params_M']:.1f} | {f(tr, 'median_ms', '{:.1f}')} | "
                     f"{f(tr, 'peak_GiB', '{:.1f}')} | {f(tr, 'model_TFLOPs', '{:.0f}')} | "
                     f"{f(row.get('train_graph', {}), 'median_ms', '{:.1f}')} | {f(sa, 'median_ms', '{:.1f}')} | {f(sa, 'peak_GiB', '{:.1f}')} | "
                     f"{f(row.get('sample_graph', {}), 'median_ms', '{:.1f}')} |")
    sp = res.get("speedup_vs_baselines", {})
    fmt = lambda v, spec: "-" if v is None else spec.format(v)  # noqa: E731
    lines.append(f"v3 ours vs baselines: train step {fmt(sp.get('train'), '{:.2f}x')} (target >= 1.5x), train "
                 f"step as a CUDA graph (both) {fmt(sp.get('train_graph'), '{:.2f}x')}, "
                 f"sample step {fmt(sp.get('sample'), '{:.2f}x')}, sample step as a CUDA graph (both) "
                 f"{fmt(sp.get('sample_graph'), '{:.2f}x')}")
    for label, v in res.get("graphed_vs_eager_baselines", {}).items():
        lines.append(f"{label}, train step as a CUDA graph vs the baselines' eager train step: {v:.2f}x")
    lines.append(f"v3 triton vs ref backend, sample step: {fmt(res.get('speedup_vs_ref_sample'), '{:.1f}x')}")
    fc = res["cases"].get("Matten-XL/2 v3", {}).get("flop_counter")
    if fc:
        lines.append(f"FlopCounterMode (torch {fc['torch']}) on one forward: {fc['counter'] / 1e9:,.1f} G; analytic, "
                     f"same work: {fc['analytic_counted_by_torch'] / 1e9:,.1f} G; analytic total incl. elementwise: "
                     f"{fc['analytic_total'] / 1e9:,.1f} G")
    base = res["cases"].get("Matten-XL/2 v3 baselines", {})
    if "baseline_rel_err" in base:
        lines.append(f"baselines vs ours, one forward: relative error {base['baseline_rel_err']:.1e} (same function)")
    latte = res["cases"].get("Latte-XL/2", {}).get("train", {}).get("median_ms")
    if latte:
        ratios = [f"{k.replace('Matten-XL/2 ', '')} {v['train']['median_ms'] / latte:.2f}x"
                  for k, v in res["cases"].items() if "median_ms" in v.get("train", {}) and "Latte" not in k]
        lines.append("train step / Latte-XL/2 train step: " + ", ".join(ratios))
    return "\n".join(lines)


def plot(section, res, path, env):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k, v in res["cases"].items() if "error" not in v and "skipped" not in v]
    short = [k.replace("Matten-XL/2 ", "") for k in labels]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("train step ms", (("train", "eager"), ("train_graph", "CUDA graph"))),
              ("sample step ms", (("sample", "eager"), ("sample_graph", "CUDA graph"))),
              ("train peak GiB (eager)", (("train", None),)))
    for ax, (unit, modes) in zip(axes, panels):
        width = 0.8 / len(modes)
        for j, (mode, name) in enumerate(modes):
            key = "peak_GiB" if "GiB" in unit else "median_ms"
            vals = [res["cases"][k].get(mode, {}).get(key) for k in labels]
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(labels))]
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if not pts:
                continue
            ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=name, hatch="//" if j else None,
                   color=["C1" if "baselines" in k else "C2" if "ref" in k else "C0"
                          for k, v in zip(labels, vals) if v is not None], alpha=0.6 if j else 1.0)
            for x, v in pts:
                ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(short, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        if len(modes) > 1:
            ax.legend(fontsize=7)
        if "sample" in unit and any("ref" in k for k in labels):
            ax.set_yscale("log")
    fig.suptitle(f"Matten-XL/2 variants vs Latte-XL/2, batch {res['batch']}, latent 16x4x32x32, {res['dtype']}: "
                 f"{env['gpu']}, commit {env['commit']}, {env['date_utc']} UTC (orange: baselines)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
