"""``python -m matten bench``: kernel and model benchmarks on the GPU, JSON + PNG under benchmarks/results/<gpu>/.

Sections (each a script in ``benchmarks/`` with a ``run(ctx)`` function, importable on its own):

* ``model``     (benchmarks/bench_model.py): training step (forward + backward + AdamW step) and sampling step
                (one forward, no CFG) time and peak memory of Matten-XL/2 variants 1-4 and Latte-XL/2 at latent
                16x4x32x32, batch 2, bf16 autocast; Matten-XL/2 v3 on our kernels vs the same weights on the baseline
                ops (benchmarks/baselines.py); kernel_backend "ref" vs "triton".
* ``crossover`` (benchmarks/bench_crossover.py): bidirectional scan vs global attention over 1024 .. 65536 tokens,
                measured time beside the eq. 5/7 FLOPs and the bytes, and the measured crossover length.
* ``kernels``   (benchmarks/bench_crossover.py): the scan and attention at the token counts of spatial (256),
                temporal (16) and global (4096) modelling at Matten-XL/2 sizes: ms, GB/s, TFLOP/s, fraction of floor.

Each result file names the GPU, torch/triton versions, the git commit (and whether the tree was dirty) and the date.
``--smoke`` runs every section at toy sizes on any device (CPU: reference backends) to check the plumbing; its
numbers mean nothing and its files are marked ``"smoke": true``.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("matten.bench")

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("model", "crossover", "kernels")
# Share of the time budget each section may use (unused time rolls over to the next one).
SECTION_SHARE = {"model": 0.50, "crossover": 0.30, "kernels": 0.20}
EXP_RATE = 4.0e12  # exp/s of an H100 (MUFU: 16 per SM per clock, 132 SMs, ~1.9 GHz); SPEC.md section 7


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> dict:
    """Short commit of the working tree and whether it had uncommitted changes (None outside a git checkout)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10)

    # A copy of the tree whose .git is missing or stale (a benchmark machine) says its commit through MATTEN_COMMIT /
    # MATTEN_DIRTY, which win when set.
    fallback = {"commit": os.environ.get("MATTEN_COMMIT"), "dirty": os.environ.get("MATTEN_DIRTY")}
    if fallback["commit"]:
        return fallback
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return fallback
    if head.returncode != 0:
        return fallback
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(device) -> dict:
    import torch

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        **git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


@dataclass
class BenchContext:
    """What a benchmark section needs: device, smoke flag, a deadline, timers, measured ceilings, a log."""

    device: object
    smoke: bool
    deadline: float  # time.monotonic() after which a section starts no new measurement
    env: dict
    ceilings: dict = field(default_factory=dict)
    max_tokens: int = 65536
    quick: bool = False  # fewer model cases (v3 ours/baselines, Latte) and crossover points (1024, 4096, 16384, 65536)
    cases: tuple = ()  # model cases to run, by label (empty: all)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bench(self, fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
        """Median ms of ``fn`` (kernels): triton.testing.do_bench on CUDA (events, L2 flushed), perf_counter else."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        return self.time_steps(fn, warmup=1, iters=2)["median_ms"]

    def time_steps(self, fn, *, warmup: int = 2, iters: int = 5) -> dict:
        """Median / min ms of ``iters`` calls of ``fn`` after ``warmup`` calls (model steps: CUDA events per call)."""
        import torch

        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters, "warmup": warmup}

    def peak_memory(self, fn) -> int | None:
        """Peak bytes allocated on the device during one call of ``fn`` (None on the CPU)."""
        import torch

        if self.device.type != "cuda":
            fn()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return int(torch.cuda.max_memory_allocated(self.device))


def measure_ceilings(ctx: BenchContext) -> dict:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, measured once on this device."""
    import torch

    if ctx.device.type != "cuda":
        return {"copy_GBps": None, "bf16_mm_TFLOPs": None, "exp_per_s": EXP_RATE}
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=ctx.device).normal_()
    b = torch.empty_like(a)
    ms = ctx.bench(lambda: b.copy_(a))
    copy = 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=ctx.device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=ctx.device)
    ms = ctx.bench(lambda: x @ y)
    mm = 2 * m ** 3 / (ms * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "bf16_mm_TFLOPs": mm, "exp_per_s": EXP_RATE}


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` as a module (benchmarks/ is a folder of scripts, not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the scripts can `import baselines`
    spec = importlib.util.spec_from_file_location(f"matten_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SECTION_SCRIPT = {"model": ("bench_model", "run"), "crossover": ("bench_crossover", "run_crossover"),
                  "kernels": ("bench_crossover", "run_kernels")}


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<gpu>/); JSON + PNG per section")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (run in this order)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="wall-clock budget: no new measurement starts after it (default 400)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="largest token count of the crossover sweep")
    parser.add_argument("--quick", action="store_true",
                        help="the essentials in about half the time: model cases v3 / v3 baselines / Latte only, "
                             "crossover at 1024, 4096, 16384, 65536 tokens")
    parser.add_argument("--cases", default="",
                        help="comma-separated model case labels to run (default: all), e.g. 'Matten-XL/2 v3 cuda'")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on any device (CPU: reference backends): checks the plumbing only")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--render", type=Path, default=None, metavar="DIR",
                        help="print the markdown tables of the result files in DIR (no benchmark is run)")


def render(folder: Path) -> str:
    """Markdown summary of the JSON result files in ``folder`` (what benchmarks/README.md shows)."""
    parts = []
    for section in SECTIONS:
        path = folder / f"{section}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        env = payload["env"]
        head = (f"<!-- {section}: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
                f"{' (dirty tree)' if env.get('dirty') else ''}, {env['date_utc']} UTC -->")
        if "error" in payload:
            parts.append(f"{head}\n## {section}: FAILED ({payload['error']})")
            continue
        script, _ = SECTION_SCRIPT[section]
        parts.append(head + "\n" + load_script(script).summarize(section, payload["results"]))
    return "\n\n".join(parts)


def main(args) -> int:
    import torch

    if args.render is not None:
        print(render(args.render))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"python -m matten bench: unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("python -m matten bench: needs a CUDA GPU (use --smoke to check the scripts on the CPU)")
    start = time.monotonic()
    env = environment(device)
    out = args.out or REPO / "benchmarks" / "results" / (gpu_slug(env["gpu"]) + ("-smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(device=device, smoke=args.smoke, deadline=start + args.budget_s, env=env,
                       max_tokens=args.max_tokens, quick=args.quick,
                       cases=tuple(c.strip() for c in args.cases.split(",") if c.strip()))
    ctx.ceilings = measure_ceilings(ctx)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}  {env['date_utc']} UTC  ceilings {ctx.ceilings}", flush=True)

    share_left = sum(SECTION_SHARE[s] for s in sections)
    summaries = []
    for section in sections:
        now = time.monotonic()
        remaining = start + args.budget_s - now
        ctx.deadline = now + remaining * SECTION_SHARE[section] / share_left
        share_left -= SECTION_SHARE[section]
        script, func = SECTION_SCRIPT[section]
        payload = {"section": section, "env": env, "ceilings": ctx.ceilings, "smoke": args.smoke, "results": {}}
        json_path = out / f"{section}.json"

        def save(results, payload=payload, json_path=json_path):
            payload["results"] = results
            write_json(json_path, payload)

        try:
            module = load_script(script)
            results = getattr(module, func)(ctx, save)
            save(results)
            summaries.append(module.summarize(section, results))
            try:
                module.plot(section, results, out / f"{section}.png", env)
            except ImportError as e:
                logger.warning("no plot for %s: %s", section, e)
        except Exception as e:  # keep the other sections' results; record what broke
            logger.exception("section %s failed", section)
            payload["error"] = f"{type(e).__name__}: {e}"
            write_json(json_path, payload)
            summaries.append(f"## {section}: FAILED ({type(e).__name__}: {e})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n# wrote {out}  ({time.monotonic() - start:.0f} s)")
    print("\n\n".join(summaries), flush=True)
    return 0
