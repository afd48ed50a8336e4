"""Shared pieces of the scan benchmarks: shapes, inputs, providers, timing, the cost model, result files.

Cost model (per (batch, dim, N, L), element size e of u/delta/B/C/out):
  fwd bytes   = e * (3 * b*d*L + 2 * b*N*L)                 u, delta read; out written; B, C read
  bwd bytes   = e * (5 * b*d*L + 4 * b*N*L)                 u, delta, dout read; du, ddelta written; B, C, dB, dC
  exp count   = b*d*N*L per direction and pass (fwd: 1; fwd+bwd: 2, the backward recomputes the decays)
  floor       = max(bytes / 3.0 TB/s, exps / 3.7 T/s)        (H100: device copy 3.0 TB/s; 132 SM x 16 ex2/clk x 1.755 GHz)
fraction of floor = floor / measured.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

SHAPES = {  # SPEC section 7: (batch, dim, N, L)
    "global XL": (2, 2304, 16, 4096),
    "global S": (8, 768, 16, 4096),
    "spatial XL": (32, 2304, 16, 256),
    "temporal XL": (512, 2304, 16, 16),
    "long": (1, 2304, 16, 16384),
}
# Beyond SPEC section 7 (--shapes only): smaller d_state at global XL (the CUDA backend's 8-state lanes kernels).
EXTRA_SHAPES = {"global XL d8": (2, 2304, 8, 4096), "global XL d4": (2, 2304, 4, 4096)}
ANCHORS = {  # SPEC section 7, mamba-ssm 2.3.2.post1 on an H100, bf16: fwd, fwd+bwd, bi fwd, bi fwd+bwd (ms)
    "global XL": (0.330, 1.74, 0.847, 3.84),
    "global S": (0.426, 2.27, 1.10, 5.00),
    "spatial XL": (0.311, 1.86, 0.817, 4.09),
    "temporal XL": (4.92, 17.7, 10.0, 35.7),
    "long": (0.871, 3.77, 2.10, 8.12),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COPY_BW, EXP_RATE = 3.0e12, 3.7e12


def scan_inputs(batch, dim, N, L, dtype, device="cuda", seed=0, requires_grad=False):
    """Mamba-like values: A = -(1..N) (S4D real), delta_bias = softplus^-1 of dt in [1e-3, 0.1], small delta."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(dim, device=device, generator=g) * (torch.log(torch.tensor(0.1)) -
                                                                    torch.log(torch.tensor(1e-3))) + torch.log(
        torch.tensor(1e-3)))
    x = dict(u=r(batch, dim, L).to(dtype), delta=(0.1 * r(batch, dim, L)).to(dtype),
             A=-torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(dim, 1),
             B=r(batch, N, L).to(dtype), C=r(batch, N, L).to(dtype), D=r(dim),
             delta_bias=dt + torch.log(-torch.expm1(-dt)))
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def bytes_model(batch, dim, N, L, elt, bwd=False):
    fwd = elt * (3 * batch * dim * L + 2 * batch * N * L)
    return fwd + (elt * (5 * batch * dim * L + 4 * batch * N * L) if bwd else 0)


def floor_ms(batch, dim, N, L, elt, bwd=False, directions=1):
    exps = batch * dim * N * L * directions * (2 if bwd else 1)
    nbytes = bytes_model(batch, dim, N, L, elt, bwd) + (elt * 2 * batch * dim * L if directions == 2 else 0)
    return 1e3 * max(nbytes / COPY_BW, exps / EXP_RATE)


def bench(fn, grad_to_none=None):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def graphed_ms(fn, leaves=()):
    """Median ms of `fn` (fwd or fwd+bwd) captured once into a CUDA graph and replayed: the device's time alone, with
    no host launch overhead (eager medians of host-bound calls are the host's). `leaves`' grads are reset to None
    before the capture, so the backward writes them into the graph's pool on every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in leaves:
                t.grad = None
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = bench(graph.replay)
    del graph
    return ms


def host_ms(fn, calls=10):
    """Host ms per call, not waiting for the device (few enough calls that the launch queue does not fill)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return ms


def peak_mem_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# providers


def mamba_provider(build_dir=None):
    """A callable (u, delta, A, B, C, D, delta_bias, softplus) -> out, or (None, why)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return (lambda u, dl, A, B, C, D, db, sp: selective_scan_fn(u, dl, A, B, C, D, None, db, sp)), "mamba_ssm"
    except Exception as e:  # noqa: BLE001
        why = f"mamba_ssm not importable ({type(e).__name__}: {e})"
    if build_dir:
        sys.path.insert(0, build_dir)
    try:
        importlib.import_module("selective_scan_cuda")
        from baselines import _MambaCudaScan  # the model benchmark's wrapper of the same extension

        return ((lambda u, dl, A, B, C, D, db, sp: _MambaCudaScan.apply(u, dl, A, B, C, D, None, db, sp)),
                "mamba-ssm selective_scan_cuda (built from source)")
    except Exception as e:  # noqa: BLE001
        return None, why + f"; selective_scan_cuda not importable ({type(e).__name__})"


def cuda_provider():
    """Our CUDA extension (matten_kernels.selective_scan.cuda), if present and built; else (None, why)."""
    try:
        from matten_kernels import selective_scan

        x = scan_inputs(1, 8, 4, 16, torch.float32)
        selective_scan(**{k: x[k] for k in ("u", "delta", "A", "B", "C")}, backend="cuda")
        return True, "matten cuda"
    except Exception as e:  # noqa: BLE001
        return None, f"cuda backend unavailable ({type(e).__name__}: {str(e)[:120]})"


def env_info(commit=None):
    import triton

    commit = commit or os.environ.get("MATTEN_COMMIT")  # the device machine's copy of .git can be stale
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__)).stdout.strip() or None
        except Exception:  # noqa: BLE001
            commit = None
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit or "unknown", python=platform.python_version(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _results_path(name, info, out_dir=None, suffix=".json"):
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    gpu = info["gpu"].replace(" ", "-")
    return os.path.join(out_dir, f"{name}-{gpu}-{info['commit']}{suffix}")


_ROW_LOG = None  # the JSON-lines file log_row appends to (start_row_log), removed by write_results


def start_row_log(name, info, out_dir=None):
    """From now on log_row also appends each row to NAME-GPU-COMMIT.rows.jsonl (its first line the info), so a run
    cut short by a timeout leaves what it measured in a file; write_results removes it once the JSON is written."""
    global _ROW_LOG
    _ROW_LOG = _results_path(name, info, out_dir, ".rows.jsonl")
    with open(_ROW_LOG, "w") as f:
        f.write(json.dumps(dict(info=info)) + "\n")


def write_results(name, rows, info, out_dir=None):
    global _ROW_LOG
    path = _results_path(name, info, out_dir)
    with open(path, "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    if _ROW_LOG is not None and os.path.exists(_ROW_LOG):
        os.remove(_ROW_LOG)
    _ROW_LOG = None
    return path


def ab_parser(shapes, variants):
    """The kernel A/B scripts' common options: --shapes, --variants, --commit, --out."""
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=shapes)
    p.add_argument("--variants", default=variants)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=".")
    return p


def rel_err(got, ref):
    """max |got - ref| / max |ref| (a float)."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def ab_env(args):
    """An A/B run's environment (``env_info``), printed."""
    info = env_info(args.commit)
    print(info)
    return info


def ab_variants(spec):
    """``"name=dict;name=dict"`` -> [(name, dict)] (the dicts as Python literals)."""
    return [(v.split("=", 1)[0], ast.literal_eval(v.split("=", 1)[1])) for v in spec.split(";")]


def ab_cases(shapes):
    """Per shape of a comma-separated list (SHAPES' names): (name, (batch, dim, N, L), bf16 inputs)."""
    for shape in shapes.split(","):
        b, d, N, L = SHAPES[shape]
        yield shape, (b, d, N, L), scan_inputs(b, d, N, L, torch.bfloat16)


def ab_failed(row, name, e, label):
    """Record and print an A/B variant that raised (the run goes on with the next)."""
    msg = f"{type(e).__name__}: {str(e)[:300]}"
    row["variants"][name] = dict(error=msg)
    print(f"{label}: {msg}")


def write_ab(stem, info, out_dir, **payload):
    """An A/B script's results as ``<out_dir>/<stem>-<gpu>-<commit>.json`` ({env: info, **payload}); the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}-{info['gpu'].replace(' ', '-')}-{info['commit']}.json")
    with open(path, "w") as fh:
        json.dump(dict(env=info, **payload), fh, indent=1)
    print("wrote", path)
    return path


def log_row(row):
    """One measured row, printed (flushed) as it is taken, and appended to the row log if one was started
    (start_row_log): a run cut short by a timeout still shows and keeps what it got."""
    print("  row:", {k: v for k, v in row.items() if v is not None}, flush=True)
    if _ROW_LOG is not None:
        with open(_ROW_LOG, "a") as f:
            f.write(json.dumps(row) + "\n")


def print_table(rows, cols):
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)))
