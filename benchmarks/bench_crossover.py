"""Kernel benchmarks against the paper's FLOPs argument (eq. 5-7): bidirectional scan vs attention.

``run_kernels``   the scan and attention at the token counts of spatial (256), temporal (16) and global (4096)
                  modelling at Matten-XL/2 sizes (batch 2, D = 1152, 16 heads x 72, d_inner = 2304, N = 16, bf16):
                  ours vs the baselines (benchmarks/baselines.py), forward and forward+backward.
``run_crossover`` global attention vs the bidirectional scan over 1024 .. 65536 tokens (batch 2, same widths):
                  measured time beside eq. 5 / eq. 7 FLOPs and the bytes, and the measured crossover length.

Cost model (the floor each measurement is held against; ceilings measured in the same run, exp rate from SPEC §7):
  attention fwd  FLOPs 4 B H J^2 d (QK^T and PV; eq. 5 counts 2 J^2 D per sequence), bytes 4 B J H d x 2 (q, k, v,
                 o in bf16); fwd+bwd FLOPs 3.5x fwd (the backward recomputes QK^T: 5 matmuls), bytes 2.5x.
                 floor = max(FLOPs / bf16 matmul rate, bytes / copy bandwidth).
  bi-scan fwd    bytes: u, delta, z, u_b, delta_b (B x d_inner x J) and B, C, B_b, C_b (B x N x J) read once, the
                 output written once, bf16; exps 2 B d_inner J N (one per state element and step, per direction);
                 FLOPs matten.flops.scan_flops (the real count) and eq. 7 (3 J (2D) N + J (2D) N^2 per direction).
                 fwd+bwd bytes: inputs 3x (read twice, gradients written once) and the output 2x (out, dout);
                 exps 2x (the backward recomputes exp(delta A)). floor = max(bytes / bandwidth, exps / exp rate).
"""

from __future__ import annotations

import math

import torch

from baselines import SCAN_PROVIDER, sdpa_video_attention, uni_selective_scan, vim_bi_selective_scan

XL = {"batch": 2, "hidden": 1152, "heads": 16, "head_dim": 72, "d_inner": 2304, "d_state": 16, "frames": 16}
SCAN_SHAPES = {  # name -> (batch, dim, N, L): the sequences of Matten-XL/2 at batch 2 (SPEC.md section 7 anchors)
    "spatial XL (256 tok)": (32, 2304, 16, 256),
    "temporal XL (16 tok)": (512, 2304, 16, 16),
    "global XL (4096 tok)": (2, 2304, 16, 4096),
}
ATTENTION_AXES = {"spatial XL (256 tok)": "spatial", "temporal XL (16 tok)": "temporal",
                  "global XL (4096 tok)": "global"}
# mamba-ssm 2.3.2.post1 selective_scan_fn on an H100, bf16, no z (SPEC.md section 7: the lead's run of 2026-11-26,
# not this run); ms: fwd, fwd+bwd, bi fwd (Vim, flips), bi fwd+bwd.
ANCHOR_MAMBA_SSM_H100 = {
    "spatial XL (256 tok)": (0.311, 1.86, 0.817, 4.09),
    "temporal XL (16 tok)": (4.92, 17.7, 10.0, 35.7),
    "global XL (4096 tok)": (0.330, 1.74, 0.847, 3.84),
}
ANCHOR_SDPA_H100 = {"spatial": (0.053, 0.43), "temporal": (0.30, 0.83), "global": (0.44, 1.89)}


def _scan_backend(ctx):
    return "triton" if ctx.device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and cost models
# ----------------------------------------------------------------------------------------------------------------------


def scan_inputs(batch, dim, N, L, device, dtype, requires_grad):
    """Bidirectional (v2) scan inputs as the mixer produces them, natural order."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    t = {
        "u": rnd(batch, dim, L), "delta": rnd(batch, dim, L, scale=0.5), "z": rnd(batch, dim, L),
        "B": rnd(batch, N, L), "C": rnd(batch, N, L),
        "u_b": rnd(batch, dim, L), "delta_b": rnd(batch, dim, L, scale=0.5),
        "B_b": rnd(batch, N, L), "C_b": rnd(batch, N, L),
    }
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).to(device)  # S4D-real
    p = {"A": A, "A_b": A.clone(), "D": torch.ones(dim, device=device), "D_b": torch.ones(dim, device=device),
         "delta_bias": torch.full((dim,), -3.0, device=device), "delta_bias_b": torch.full((dim,), -3.0, device=device)}
    return t, p


def scan_cost(batch, dim, N, L, itemsize, *, bidirectional=True, has_z=True):
    from matten.flops import scan_flops

    dirs = 2 if bidirectional else 1
    big = (2 * dirs + (1 if has_z else 0)) * batch * dim * L  # u, delta per direction, z
    small = 2 * dirs * batch * N * L  # B, C per direction
    in_bytes = (big + small) * itemsize
    out_bytes = batch * dim * L * itemsize
    exps = dirs * batch * dim * L * N
    eq7 = dirs * batch * (3 * L * dim * N + L * dim * N * N)
    real = scan_flops(batch, dim, L, N, bidirectional=bidirectional, has_z=has_z)
    return {"fwd": {"bytes": in_bytes + out_bytes, "exps": exps, "flops": real, "eq7_flops": eq7},
            "fwdbwd": {"bytes": 3 * in_bytes + 2 * out_bytes, "exps": 2 * exps}}


def attention_cost(batch, tokens, heads, head_dim, seq_len, itemsize):
    mm = 4 * batch * heads * tokens * seq_len * head_dim
    by = 4 * batch * tokens * heads * head_dim * itemsize
    eq5 = 2 * batch * tokens * seq_len * heads * head_dim  # 2 J^2 D per sequence of J tokens
    return {"fwd": {"flops": mm, "bytes": by, "eq5_flops": eq5}, "fwdbwd": {"flops": 7 * mm // 2, "bytes": 5 * by // 2}}


def _floor_ms(ctx, cost):
    c = ctx.ceilings
    if not c.get("copy_GBps"):  # no measured ceilings (CPU smoke run): no floor
        return None
    times = [0.0]
    if c.get("copy_GBps"):
        times.append(cost["bytes"] / (c["copy_GBps"] * 1e9) * 1e3)
    if c.get("bf16_mm_TFLOPs") and "exps" not in cost and "flops" in cost:
        times.append(cost["flops"] / (c["bf16_mm_TFLOPs"] * 1e12) * 1e3)
    if "exps" in cost:
        times.append(cost["exps"] / c.get("exp_per_s", 4e12) * 1e3)
    return max(times) if len(times) > 1 else None


def _entry(ctx, ms, cost):
    e = {"ms": ms, **cost}
    if ms:
        e["GBps"] = cost["bytes"] / (ms * 1e-3) / 1e9
        if "flops" in cost:
            e["TFLOPs"] = cost["flops"] / (ms * 1e-3) / 1e12
        floor = _floor_ms(ctx, cost)
        if floor:
            e["floor_ms"] = floor
            e["fraction_of_floor"] = floor / ms
    return e


# ----------------------------------------------------------------------------------------------------------------------
# Timed callables
# ----------------------------------------------------------------------------------------------------------------------


def scan_callables(ctx, batch, dim, N, L, dtype):
    """name -> (fwd, fwd+bwd) callables for our bi-scan, the Vim composition and our unidirectional scan (no z)."""
    from matten_kernels import bi_selective_scan, selective_scan

    t, p = scan_inputs(batch, dim, N, L, ctx.device, dtype, requires_grad=True)
    backend = _scan_backend(ctx)
    dout = torch.randn(batch, dim, L, device=ctx.device, dtype=dtype)

    def ours():
        return bi_selective_scan(t["u"], t["delta"], p["A"], t["B"], t["C"], p["D"], z=t["z"],
                                 delta_bias=p["delta_bias"], delta_softplus=True, u_b=t["u_b"], delta_b=t["delta_b"],
                                 A_b=p["A_b"], B_b=t["B_b"], C_b=t["C_b"], D_b=p["D_b"],
                                 delta_bias_b=p["delta_bias_b"], backend=backend)

    def vim():
        return vim_bi_selective_scan(t["u"], t["delta"], p["A"], t["B"], t["C"], p["D"], t["z"], p["delta_bias"],
                                     u_b=t["u_b"], delta_b=t["delta_b"], A_b=p["A_b"], B_b=t["B_b"], C_b=t["C_b"],
                                     D_b=p["D_b"], delta_bias_b=p["delta_bias_b"])

    def uni():
        return selective_scan(t["u"], t["delta"], p["A"], t["B"], t["C"], p["D"], delta_bias=p["delta_bias"],
                              delta_softplus=True, backend=backend)

    def uni_baseline():
        return uni_selective_scan(t["u"], t["delta"], p["A"], t["B"], t["C"], p["D"], None, p["delta_bias"], True)

    def fwd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    def fwdbwd(f, inputs):
        def run():
            out = f()
            return torch.autograd.grad(out, inputs, dout)
        return run

    bi_in = [t[k] for k in ("u", "delta", "z", "B", "C", "u_b", "delta_b", "B_b", "C_b")]
    uni_in = [t[k] for k in ("u", "delta", "B", "C")]
    fns = {"bi ours": (fwd(ours), fwdbwd(ours, bi_in)), "bi vim": (fwd(vim), fwdbwd(vim, bi_in)),
           "uni ours": (fwd(uni), fwdbwd(uni, uni_in))}
    if not SCAN_PROVIDER.startswith("matten_kernels"):
        fns["uni baseline"] = (fwd(uni_baseline), fwdbwd(uni_baseline, uni_in))
    return fns


def attention_callables(ctx, batch, frames, spatial, heads, head_dim, axis, dtype):
    """name -> (fwd, fwd+bwd) for our video_attention and the SDPA + rearrange baseline, q/k/v views of packed qkv."""
    from matten_kernels import video_attention

    qkv = torch.randn(batch, frames * spatial, 3, heads, head_dim, device=ctx.device, dtype=dtype, requires_grad=True)
    dout = torch.randn(batch, frames * spatial, heads, head_dim, device=ctx.device, dtype=dtype)
    backend = "triton" if ctx.device.type == "cuda" else None

    def ours():
        q, k, v = qkv.unbind(2)
        return video_attention(q, k, v, num_frames=frames, axis=axis, backend=backend)

    def sdpa():
        q, k, v = qkv.unbind(2)
        return sdpa_video_attention(q, k, v, num_frames=frames, axis=axis)

    def fwd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    def fwdbwd(f):
        def run():
            return torch.autograd.grad(f(), qkv, dout)
        return run

    return {"ours": (fwd(ours), fwdbwd(ours)), "sdpa": (fwd(sdpa), fwdbwd(sdpa))}


def _time(ctx, fn, log_name):
    if ctx.time_left() <= 0:
        return None, "skipped: time budget"
    try:
        return ctx.bench(fn), None
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return None, f"OOM: {str(e).splitlines()[0]}"
    except Exception as e:  # a failing provider must not hide the others' numbers
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


def baseline_check(ctx):
    """Our bi-scan vs the Vim composition on the baseline provider, fp32, every input gradient (same inputs and
    cotangent): relative errors. A baseline that computed something else would make every speed comparison moot."""
    batch, dim, N, L = (2, 64, 16, 300) if not ctx.smoke else (1, 8, 4, 16)
    fns = scan_callables(ctx, batch, dim, N, L, torch.float32)
    ours, vim = fns["bi ours"][1](), fns["bi vim"][1]()
    errs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(vim, ours)]
    return {"bi": {"shape": [batch, dim, N, L], "grad_rel_err_max": max(errs), "grad_rel_errs": errs}}


def run_kernels(ctx, save):
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    itemsize = torch.tensor([], dtype=dtype).element_size()
    res = {"scan_provider": SCAN_PROVIDER, "dtype": str(dtype), "scan": {}, "attention": {},
           "anchors": {"mamba_ssm_h100": ANCHOR_MAMBA_SSM_H100, "sdpa_h100": ANCHOR_SDPA_H100,
                       "note": "SPEC.md section 7: the lead's H100 run of 2026-11-26, not this run"}}
    try:
        res["baseline_check"] = baseline_check(ctx)
    except Exception as e:  # recorded: the timings below still run
        res["baseline_check"] = {"error": f"{type(e).__name__}: {e}"}
    save(res)
    for name, (batch, dim, N, L) in SCAN_SHAPES.items():
        if ctx.smoke:
            batch, dim, N, L = 2, 8, 4, min(L, 32)
        row = {"shape": {"batch": batch, "dim": dim, "N": N, "L": L}}
        for provider, (f, fb) in scan_callables(ctx, batch, dim, N, L, dtype).items():
            bi = provider.startswith("bi")
            cost = scan_cost(batch, dim, N, L, itemsize, bidirectional=bi, has_z=bi)
            for mode, fn in (("fwd", f), ("fwdbwd", fb)):
                ms, err = _time(ctx, fn, f"{name} {provider} {mode}")
                row[f"{provider} {mode}"] = _entry(ctx, ms, cost[mode]) if ms else {"error": err}
        res["scan"][name] = row
        save(res)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    B, Fr, H, hd = XL["batch"], XL["frames"], XL["heads"], XL["head_dim"]
    S = 256
    if ctx.smoke:
        B, Fr, S, H, hd = 1, 4, 16, 2, 8
    for name, axis in ATTENTION_AXES.items():
        seq = {"spatial": S, "temporal": Fr, "global": Fr * S}[axis]
        row = {"shape": {"batch": B, "frames": Fr, "spatial": S, "heads": H, "head_dim": hd, "axis": axis}}
        cost = attention_cost(B, Fr * S, H, hd, seq, itemsize)
        for provider, (f, fb) in attention_callables(ctx, B, Fr, S, H, hd, axis, dtype).items():
            for mode, fn in (("fwd", f), ("fwdbwd", fb)):
                ms, err = _time(ctx, fn, f"{name} {provider} {mode}")
                row[f"{provider} {mode}"] = _entry(ctx, ms, cost[mode]) if ms else {"error": err}
        res["attention"][name] = row
        save(res)
    return res


def _crossover(tokens, t_scan, t_attn):
    """Token count where attention becomes slower than the scan (log-log interpolation); None if not bracketed."""
    pts = [(J, s, a) for J, s, a in zip(tokens, t_scan, t_attn) if s and a]
    if not pts:
        return {"tokens": None, "note": "no data"}
    if pts[0][2] >= pts[0][1]:
        return {"tokens": None, "note": f"attention already slower at {pts[0][0]} tokens (crossover <= {pts[0][0]})"}
    for (J0, s0, a0), (J1, s1, a1) in zip(pts, pts[1:]):
        if a1 >= s1:
            r0, r1 = math.log(a0 / s0), math.log(a1 / s1)
            x = math.log(J0) + (math.log(J1) - math.log(J0)) * (-r0) / (r1 - r0)
            return {"tokens": round(math.exp(x)), "note": f"between {J0} and {J1} tokens"}
    return {"tokens": None, "note": f"attention still faster at {pts[-1][0]} tokens (crossover > {pts[-1][0]})"}


def predicted_crossovers(d_state):
    """Token counts where attention's FLOPs exceed the bidirectional scan's (D and batch cancel)."""
    from matten.flops import SCAN_COMBINE, SCAN_GATE, SCAN_PER_CHANNEL, SCAN_PER_STATE

    N, E = d_state, 2
    # eq. 5 vs eq. 7 (two directions): 2 J^2 D = 2 (3 J E D N + J E D N^2)  ->  J = E (3N + N^2)
    eq = E * (3 * N + N * N)
    # real FLOPs: 4 J^2 D (two matmuls) = J E D (2 (7N + 7) + 1 + 5)  ->  J = E (2 (7N+7) + 6) / 4
    real = E * (2 * (SCAN_PER_STATE * N + SCAN_PER_CHANNEL) + SCAN_COMBINE + SCAN_GATE) / 4
    return {"eq5_vs_eq7_tokens": eq, "real_flops_tokens": round(real)}


def run_crossover(ctx, save):
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    itemsize = torch.tensor([], dtype=dtype).element_size()
    B, H, hd, dim, N, Fr = XL["batch"], XL["heads"], XL["head_dim"], XL["d_inner"], XL["d_state"], XL["frames"]
    tokens = [1 << i for i in range(10, 17) if (1 << i) <= ctx.max_tokens and (not ctx.quick or i % 2 == 0)]
    if ctx.smoke:
        B, H, hd, dim, N, Fr = 1, 2, 8, 16, 4, 4
        tokens = [16, 32, 64]
    res = {"scan_provider": SCAN_PROVIDER, "dtype": str(dtype),
           "shape": {"batch": B, "heads": H, "head_dim": hd, "d_inner": dim, "d_state": N},
           "predicted": predicted_crossovers(N), "points": []}
    for J in tokens:
        point = {"tokens": J}
        acost = attention_cost(B, J, H, hd, J, itemsize)
        for provider, (f, fb) in attention_callables(ctx, B, Fr, J // Fr, H, hd, "global", dtype).items():
            for mode, fn in (("fwd", f), ("fwdbwd", fb)):
                ms, err = _time(ctx, fn, f"attn {provider} {J} {mode}")
                point[f"attention {provider} {mode}"] = _entry(ctx, ms, acost[mode]) if ms else {"error": err}
        scost = scan_cost(B, dim, N, J, itemsize)
        fns = scan_callables(ctx, B, dim, N, J, dtype)
        for provider in ("bi ours", "bi vim"):
            f, fb = fns[provider]
            for mode, fn in (("fwd", f), ("fwdbwd", fb)):
                ms, err = _time(ctx, fn, f"scan {provider} {J} {mode}")
                point[f"scan {provider} {mode}"] = _entry(ctx, ms, scost[mode]) if ms else {"error": err}
        del fns
        res["points"].append(point)
        save(res)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    ms = lambda p, k: p.get(k, {}).get("ms")  # noqa: E731
    res["crossover"] = {}
    for mode in ("fwd", "fwdbwd"):
        T = [p["tokens"] for p in res["points"]]
        res["crossover"][f"ours {mode}"] = _crossover(
            T, [ms(p, f"scan bi ours {mode}") for p in res["points"]],
            [ms(p, f"attention ours {mode}") for p in res["points"]])
        res["crossover"][f"baselines {mode}"] = _crossover(
            T, [ms(p, f"scan bi vim {mode}") for p in res["points"]],
            [ms(p, f"attention sdpa {mode}") for p in res["points"]])
        res["crossover"][f"our scan vs sdpa {mode}"] = _crossover(
            T, [ms(p, f"scan bi ours {mode}") for p in res["points"]],
            [ms(p, f"attention sdpa {mode}") for p in res["points"]])
    return res


# ----------------------------------------------------------------------------------------------------------------------
# Summary and plots
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(e, key="ms", spec="{:.3f}"):
    v = e.get(key) if isinstance(e, dict) else None
    return spec.format(v) if v is not None else (e.get("error", "-")[:18] if isinstance(e, dict) else "-")


def summarize(section, res):
    lines = []
    if section == "kernels":
        lines.append(f"## kernels ({res['dtype']}; scan baseline: {res['scan_provider']})")
        bc = res.get("baseline_check", {})
        if "bi" in bc:
            lines.append(f"baseline check (fp32, shape {bc['bi']['shape']}): Vim composition vs our bi-scan, "
                         f"max relative error over the 9 input gradients {bc['bi']['grad_rel_err_max']:.1e}")
        elif "error" in bc:
            lines.append(f"baseline check FAILED: {bc['error']}")
        lines.append("| shape | op | ms | rate | % of floor | H100 anchor ms (SPEC §7, not this run) |")
        lines.append("|---|---|---|---|---|---|")
        # anchors: mamba-ssm selective_scan_fn (no z) for the uni rows, mamba-ssm with flips for the Vim rows, SDPA
        scan_anchor = {"uni ours fwd": 0, "uni ours fwdbwd": 1, "bi vim fwd": 2, "bi vim fwdbwd": 3}
        for name, row in res["scan"].items():
            for k, e in row.items():
                if k != "shape":
                    frac = e.get("fraction_of_floor")
                    a = ANCHOR_MAMBA_SSM_H100.get(name)
                    anchor = f"{a[scan_anchor[k]]} (mamba-ssm)" if a and k in scan_anchor else "-"
                    lines.append(f"| {name} | scan {k} | {_fmt(e)} | {_fmt(e, 'GBps', '{:.0f} GB/s')} | "
                                 f"{'-' if frac is None else f'{100 * frac:.0f}%'} | {anchor} |")
        for name, row in res["attention"].items():
            axis = ATTENTION_AXES[name]
            for k, e in row.items():
                if k != "shape":
                    frac = e.get("fraction_of_floor")
                    a = ANCHOR_SDPA_H100.get(axis)
                    anchor = f"{a[0 if k.endswith('fwd') else 1]} (SDPA)" if a and k.startswith("sdpa") else "-"
                    lines.append(f"| {name} | attention {k} | {_fmt(e)} | {_fmt(e, 'TFLOPs', '{:.0f} TF/s')} | "
                                 f"{'-' if frac is None else f'{100 * frac:.0f}%'} | {anchor} |")
    else:
        s = res["shape"]
        lines.append(f"## crossover: global attention vs bidirectional scan ({res['dtype']}, batch {s['batch']}, "
                     f"{s['heads']}x{s['head_dim']} heads, d_inner {s['d_inner']}, N {s['d_state']}; "
                     f"scan baseline: {res['scan_provider']})")
        lines.append("| tokens | attn ours fwd+bwd | attn sdpa fwd+bwd | scan ours fwd+bwd | scan vim fwd+bwd | "
                     "attn ours fwd | scan ours fwd |")
        lines.append("|---|---|---|---|---|---|---|")
        for p in res["points"]:
            lines.append(f"| {p['tokens']} | {_fmt(p.get('attention ours fwdbwd', {}))} | "
                         f"{_fmt(p.get('attention sdpa fwdbwd', {}))} | {_fmt(p.get('scan bi ours fwdbwd', {}))} | "
                         f"{_fmt(p.get('scan bi vim fwdbwd', {}))} | {_fmt(p.get('attention ours fwd', {}))} | "
                         f"{_fmt(p.get('scan bi ours fwd', {}))} |")
        pr = res["predicted"]
        lines.append(f"predicted crossover (FLOPs): eq.5 vs eq.7 {pr['eq5_vs_eq7_tokens']} tokens; real FLOPs "
                     f"{pr['real_flops_tokens']} tokens")
        for k, v in res.get("crossover", {}).items():
            lines.append(f"measured crossover {k}: {v['tokens']} ({v['note']})")
    return "\n".join(lines)


def plot(section, res, path, env):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{env['gpu']}, commit {env['commit']}, {env['date_utc']} UTC"
    if section == "crossover":
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        T = [p["tokens"] for p in res["points"]]
        for ax, mode in zip(axes, ("fwd", "fwdbwd")):
            for key, style in ((f"attention ours {mode}", "o-"), (f"attention sdpa {mode}", "o--"),
                               (f"scan bi ours {mode}", "s-"), (f"scan bi vim {mode}", "s--")):
                ys = [p.get(key, {}).get("ms") for p in res["points"]]
                pts = [(t, y) for t, y in zip(T, ys) if y]
                if pts:
                    ax.plot(*zip(*pts), style, label=key.replace(f" {mode}", ""))
            for key, style in ((f"attention ours {mode}", ":"), (f"scan bi ours {mode}", ":")):
                ys = [p.get(key, {}).get("floor_ms") for p in res["points"]]
                pts = [(t, y) for t, y in zip(T, ys) if y]
                if pts:
                    ax.plot(*zip(*pts), style, color="gray", label=f"floor {key.split(' ')[0]}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens J")
            ax.set_ylabel("ms")
            ax.set_title("forward" if mode == "fwd" else "forward + backward")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"global attention vs bidirectional scan: {title}", fontsize=9)
    else:
        rows = []
        for name, row in res["scan"].items():
            for k in ("bi ours", "bi vim"):
                for mode in ("fwd", "fwdbwd"):
                    rows.append((f"scan {name.split(' (')[0]}\n{k} {mode}", row.get(f"{k} {mode}", {}).get("ms")))
        for name, row in res["attention"].items():
            for k in ("ours", "sdpa"):
                for mode in ("fwd", "fwdbwd"):
                    rows.append((f"attn {name.split(' (')[0]}\n{k} {mode}", row.get(f"{k} {mode}", {}).get("ms")))
        rows = [(n, v) for n, v in rows if v]
        fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(rows)), 5))
        ax.bar(range(len(rows)), [v for _, v in rows],
               color=["C0" if ("ours" in n) else "C1" for n, _ in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([n for n, _ in rows], rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"kernels at Matten-XL/2 sizes (blue: ours, orange: baselines): {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
