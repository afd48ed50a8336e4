"""Host (Python) time per eager call of each Triton op, with the kernel launches stubbed out (runs on a CPU).

Short-sequence attention and small scans are bound by host time on the GPU machine (NOTES_attention.md), so this is
tracked without a GPU: the ops run under TRITON_INTERPRET=1 on CPU tensors with ``_launch.launch`` replaced by a
no-op, so what is timed is validation, dispatch, autograd, allocations and the launchers' own Python. Each op is
timed through its eager autograd.Function (the default) and through its torch.library custom op (what torch.compile
and dispatch modes use), fwd+bwd, as the minimum and median over rounds of back-to-back calls.

``--launch`` times something narrower instead: one cached launch through ``_launch.launch`` (see
:func:`time_cached_launch`), optionally against the ``_launch.py`` of another commit (``--launch-baseline REV``).

Usage: TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--rounds 9] [--calls 30] [--out FILE.json]
       TRITON_INTERPRET=1 python benchmarks/host_overhead.py --launch [--launch-baseline REV] [--rounds 15]
(with --launch, each round is 100 x --calls launches)
Absolute numbers depend on the CPU (the GPU machine's host was 2x slower or faster from one day's machine to the
next); compare the two paths, and commits, on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    sys.exit("host_overhead: set TRITON_INTERPRET=1 (the ops run on CPU tensors with their launches stubbed)")

import torch  # noqa: E402

from matten_kernels import bi_selective_scan, selective_scan, video_attention, video_attention_qkvpacked  # noqa: E402
from matten_kernels.conv1d import bi_depthwise_conv1d_silu  # noqa: E402
from matten_kernels.adaln import gated_residual, layer_norm_modulate  # noqa: E402
from matten_kernels.modules import channel_linear  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def stub_launches():
    """Every launcher module binds ``launch`` at import: replace each binding with a no-op."""
    from matten_kernels.attention import triton_bwd as ab, triton_fwd as af
    from matten_kernels.conv1d import triton_bwd as cb, triton_fwd as cf
    from matten_kernels.adaln import triton_kernels as nk
    from matten_kernels.modules import ssm_params as mp
    from matten_kernels.selective_scan import triton_bwd as sb, triton_fwd as sf

    for module in (af, ab, cf, cb, sf, sb, nk, mp):
        module.launch = lambda *args, **kwargs: None


def cases():
    """name -> (leaves, fn): small tensors (the host cost does not depend on the size)."""
    r = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    b, d, L, N = 2, 64, 256, 16
    scan = dict(u=r(b, d, L), delta=r(b, d, L), A=(-torch.rand(d, N)).requires_grad_(), B=r(b, N, L), C=r(b, N, L),
                D=r(d), z=r(b, d, L), delta_bias=r(d))
    qkv = r(2, 4 * 16, 3, 2, 32)
    conv = dict(x=r(b, d, L), w=r(d, 4), bias=r(d), w_b=r(d, 4), bias_b=r(d))
    x, y, mod = r(b, L, d), r(b, L, d), r(b, 3 * d)
    shift, scale, gate = mod.chunk(3, dim=1)
    w = r(2 * d, d)
    return {
        "layer_norm_modulate": lambda: layer_norm_modulate(x, shift, scale, backend="triton"),
        "  (torch: LN, modulate)": lambda: F.layer_norm(x, (d,)) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1),
        "gated_residual": lambda: gated_residual(x, gate, y, backend="triton"),
        "  (torch: x + gate * y)": lambda: x + gate.unsqueeze(1) * y,
        "channel_linear (in_proj)": lambda: channel_linear(x, w, transpose_in=True),
        "  (torch: F.linear)": lambda: F.linear(x, w),
        "selective_scan (z, D, bias, softplus)": lambda: selective_scan(*scan.values(), True, backend="triton"),
        "bi_selective_scan (Vim v1)": lambda: bi_selective_scan(*scan.values(), True, A_b=scan["A"],
                                                                backend="triton"),
        "bi_depthwise_conv1d_silu": lambda: sum(bi_depthwise_conv1d_silu(*conv.values(), backend="triton")),
        "video_attention temporal": lambda: video_attention(*qkv.unbind(2), num_frames=4, axis="temporal",
                                                            backend="triton"),
        "video_attention_qkvpacked temporal": lambda: video_attention_qkvpacked(qkv, num_frames=4, axis="temporal",
                                                                                backend="triton"),
    }


def time_fwd_bwd(fn, rounds, calls):
    def one():
        out = fn()
        out.backward(torch.ones_like(out))

    for _ in range(5):
        one()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            one()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return min(per_call), statistics.median(per_call)


def _load_launch_module(rev):
    """matten_kernels/_launch.py as of git revision ``rev``, imported as a separate module of the package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.check_output(["git", "show", f"{rev}:matten_kernels/_launch.py"], cwd=root, text=True)
    module = types.ModuleType(f"matten_kernels._launch_at_{rev}")
    module.__package__ = "matten_kernels"
    exec(compile(src, f"{rev}:matten_kernels/_launch.py", "exec"), module.__dict__)
    return module


def _c_launch_stub(*args):
    """Stands in for Triton's generated C launch function (which parses its arguments and calls cuLaunchKernel);
    every variant timed calls it once with the same arguments, so its cost cancels out of the comparison."""


class _FakeJITFunction:
    """What ``_launch`` uses of a JITFunction: ``params``, and ``kernel[grid](*args, **meta)``, which here returns
    the compiled kernel without launching it (only a cache miss calls it)."""

    def __init__(self, params, compiled):
        self.params, self.compiled = params, compiled

    def __getitem__(self, grid):
        return lambda *args, **meta: self.compiled


def _pretend_cuda():
    """torch's CUDA entry points that Triton's launch layers and ``_launch`` call, as C builtins of about the same
    cost (``int``, which returns 0: device 0, stream 0), and Triton's active driver getting them as its CUDA driver
    does. For this process only: nothing here can launch a kernel."""
    import torch
    from triton.runtime.driver import driver

    torch._C._cuda_getDevice = torch._C._cuda_getCurrentRawStream = int
    torch.cuda._initialized = True  # torch.cuda.current_device() runs as on an initialised CUDA build
    driver.set_active(types.SimpleNamespace(get_current_device=torch.cuda.current_device,
                                            get_current_stream=torch._C._cuda_getCurrentRawStream))


def _fake_gpu_kernel(args, meta):
    """A kernel for a launch of ``args`` / ``meta`` as on a CUDA machine (see :func:`_pretend_cuda`).

    Its compiled kernel is an instance of the installed Triton's own CompiledKernel whose launcher is its own
    CudaLauncher (made without compiling anything, holding the attributes their launch path reads, the C launch
    replaced by :func:`_c_launch_stub`), so ``compiled[grid](...)`` runs Triton's real Python layers.
    ``kernel[grid](...)`` returns it, as JITFunction.run does once it has compiled."""
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel

    launcher = object.__new__(CudaLauncher)
    for name, value in dict(launch=_c_launch_stub, num_ctas=1, global_scratch_size=0, global_scratch_align=1,
                            profile_scratch_size=0, profile_scratch_align=1, launch_cooperative_grid=False,
                            launch_pdl=False, gsan_enabled=False, arg_annotations=None, kernel_signature=None).items():
        setattr(launcher, name, value)  # the attributes of Triton 3.6's and 3.9's launchers
    compiled = object.__new__(CompiledKernel)
    for name, value in dict(module=object(), _module_pid=-1, function=1, packed_metadata=(4, 1, 0), _run=launcher,
                            src=None, name="kernel", hash="0").items():  # _module_pid: 3.9 unloads none of ours
        setattr(compiled, name, value)
    params = [types.SimpleNamespace(name=f"a{i}") for i in range(len(args))]
    params += [types.SimpleNamespace(name=n) for n in meta if not n.startswith("num_")]
    return _FakeJITFunction(params, compiled)


def time_cached_launch(rounds, calls, baseline_rev=None):
    """Host time of one cache hit of ``_launch.launch`` (current tree), with a fake compiled kernel: the attention
    backward's argument list (10 tensors, 6 sizes, 2 floats, 16 strides, 13 meta-parameters). Variants, timed in
    interleaved rounds: ``current`` as it runs on this Triton; ``current, compiled[grid]`` with the direct launch
    off (the new key, Triton's layers); ``baseline`` the ``_launch.py`` of ``baseline_rev``. The direct launch is
    only taken on a Triton it was verified for (3.6): on another, ``current`` is ``current, compiled[grid]``."""
    import torch
    import triton

    from matten_kernels import _launch

    tensors = [torch.empty(4096, dtype=torch.bfloat16) for _ in range(10)]
    args = (*tensors, 8, 4096, 1024, 64, 4, 64 * 8 * 64, 0.125, 0.18, *[8 * 64 * 4096, 64 * 8, 64, 1] * 4)
    meta = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_DT=64, PACK_LEN=0, DOT_PRECISION="tf32", ALIGN=8, BLOCK_HELD=64,
                BLOCK_STREAM=64, MASK_STREAM=False, DKDV=True, DQ=True, DELTA_IN_BUFFER=False, num_warps=4,
                num_stages=2)
    grid = (1024,)
    _pretend_cuda()
    os.environ["TRITON_INTERPRET"] = "0"  # what the baseline's per-call check reads on a GPU machine
    _launch._INTERPRETING = False
    _launch._get_device, _launch._raw_stream = torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream
    variants = {}
    verified = _launch._TRITON_VERIFIED
    _launch._TRITON_VERIFIED = False
    kernel = _fake_gpu_kernel(args, meta)
    _launch.launch(kernel, grid, args, meta)  # the miss: its entry launches through compiled[grid]
    variants["current, compiled[grid]"] = (_launch.launch, kernel)
    _launch._TRITON_VERIFIED = verified
    kernel = _fake_gpu_kernel(args, meta)
    _launch.launch(kernel, grid, args, meta)
    variants["current"] = (_launch.launch, kernel)
    if baseline_rev:
        baseline = _load_launch_module(baseline_rev)
        kernel = _fake_gpu_kernel(args, meta)
        baseline.launch(kernel, grid, args, meta)
        variants[f"baseline {baseline_rev}"] = (baseline.launch, kernel)
    per_call = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, kernel) in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(kernel, grid, args, meta)
            per_call[name].append((time.perf_counter() - t0) / calls * 1e6)
    results = []
    for name, times in per_call.items():
        lo, med = min(times), statistics.median(times)
        results.append(dict(variant=name, min_us=lo, median_us=med))
        print(f"cached launch, {name:32s} min {lo:6.2f} us, median {med:6.2f} us  (triton {triton.__version__}, "
              f"direct launch {'on' if verified else 'off'})", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--launch", action="store_true", help="time one cached _launch.launch call instead")
    ap.add_argument("--launch-baseline", default=None, metavar="REV",
                    help="with --launch: also time matten_kernels/_launch.py as of this git revision")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.launch:
        results = time_cached_launch(args.rounds, args.calls * 100, args.launch_baseline)  # a launch is ~10 us
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(torch=torch.__version__, results=results), fh, indent=1)
        return
    stub_launches()
    results = []
    import importlib

    modules = [importlib.import_module(m) for m in ("matten_kernels.selective_scan._ops",
                                                     "matten_kernels.conv1d.interface",
                                                     "matten_kernels.attention.interface",
                                                     "matten_kernels.adaln.interface")]
    for name, fn in cases().items():
        for path, forced in (("autograd.Function (eager default)", False), ("torch.library custom op", True)):
            for module in modules:  # each imported use_custom_op by name
                module.use_custom_op = lambda forced=forced: forced
            lo, med = time_fwd_bwd(fn, args.rounds, args.calls)
            results.append(dict(op=name, path=path, min_us=lo, median_us=med))
            print(f"{name:40s} {path:36s} fwd+bwd host min {lo:6.0f} us, median {med:6.0f} us", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(cpu_threads=1, torch=torch.__version__, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
