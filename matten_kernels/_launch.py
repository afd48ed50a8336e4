"""A leaner launch path for Triton kernels whose configuration is chosen by the caller (no autotuner).

``kernel[grid](*args, **meta)`` costs tens of microseconds of Python per launch on a GPU host (binding and
specialising every argument, building the cache key; NOTES_attention.md measured ~100 us per launch through
``triton.autotune`` on the H100 machine's CPU). Short-sequence attention and the scan at small shapes are bound by
that host time, not by their kernels. :func:`launch` keeps that path for the first call of each *specialisation* and
then calls the compiled kernel's launcher directly.

Correctness rests on the cache key: it holds every property Triton specialises a compiled kernel on, so a cached
kernel is only reused for arguments Triton would have compiled the same way:
  * tensors: dtype and whether the data pointer is 16-byte aligned;
  * ints: whether the value is 1, whether it is divisible by 16, and whether it fits in int32;
  * floats, None: their type; bools: their value. Any other type (a numpy int, a torch scalar...) is refused, since
    Triton might specialise it in ways this key does not see.
  * the meta-parameters (constexprs, num_warps, num_stages) by value;
  * the current CUDA device (a compiled kernel is loaded into one device's context).
Under ``TRITON_INTERPRET=1`` (CPU) every call takes Triton's normal path.
"""

from __future__ import annotations

import torch

from ._backend import triton_interpreting

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_CACHE: dict = {}


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). ``triton.cdiv`` is a constexpr function now, ~3 us of Python per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side smallest power of two >= n (1 for n <= 1); see :func:`cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _spec(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, _I32_MIN <= a <= _I32_MAX)
    if a is None or isinstance(a, float):
        return type(a)
    raise TypeError(f"matten_kernels._launch: unsupported kernel argument type {type(a).__name__}")


def launch(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)``, where ``args`` are the kernel's leading runtime parameters in order and
    ``meta`` names its remaining parameters (constexprs) plus optional ``num_warps`` / ``num_stages``."""
    if triton_interpreting():
        kernel[grid](*args, **meta)
        return
    # the current device too: a compiled kernel's module is loaded into one device's context (Triton keeps one cache
    # per device for the same reason)
    key = (kernel, torch.cuda.current_device(), tuple(map(_spec, args)), tuple(meta.items()))
    hit = _CACHE.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        names = [p.name for p in kernel.params[len(args):]]
        missing = [n for n in names if n not in meta]
        if missing or not hasattr(compiled, "__getitem__"):
            # a parameter left to its default value, or a Triton whose run() returns no compiled kernel: keep
            # Triton's own path for this kernel
            _CACHE[key] = False
            return
        _CACHE[key] = (compiled, tuple(meta[n] for n in names))
        return
    if hit is False:
        kernel[grid](*args, **meta)
        return
    compiled, tail = hit
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
