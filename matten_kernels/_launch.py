"""A leaner launch path for Triton kernels whose configuration is chosen by the caller (no autotuner).

``kernel[grid](*args, **meta)`` costs tens of microseconds of Python per launch on a GPU host (binding and
specialising every argument, building the cache key; NOTES_attention.md measured ~100 us per launch through
``triton.autotune`` on the H100 machine's CPU). Short-sequence attention and the scan at small shapes are bound by
that host time, not by their kernels. :func:`launch` keeps that path for the first call of each *specialisation* and
then launches the compiled kernel itself.

Correctness rests on the cache key: it holds every property Triton specialises a compiled kernel on, so a cached
kernel is only reused for arguments Triton would have compiled the same way (checked against Triton 3.6 and 3.9's
``native_specialize_impl``):
  * tensors: dtype and whether the data pointer is 16-byte aligned;
  * ints: whether the value is 1, whether it is divisible by 16, and its integer type (int32 range, int64 range,
    uint64 above that);
  * floats, None: their type; bools: their value. Any other type (a numpy int, a torch scalar...) is refused, since
    Triton might specialise it in ways this key does not see.
  * the meta-parameters (constexprs, num_warps, num_stages) by value;
  * the current CUDA device (a compiled kernel is loaded into one device's context).
Under ``TRITON_INTERPRET=1`` (CPU) every call takes Triton's normal path.

Two caches, so that the per-call key is cheap (host time is the point of this module):
  * ``_BY_CLASS`` is keyed by exactly the properties above (:func:`_spec` per argument). Each entry stands for one
    kernel Triton compiled, so it grows only as Triton's own kernel cache does.
  * ``_BY_VALUE`` is what a call looks up first. Its key holds ints by value, which determines everything the class
    key holds about them, and is built without a Python call per argument (:func:`_value_key`). Varying shapes would
    grow it without bound, so it is emptied when it reaches ``_BY_VALUE_MAX`` entries; a call it misses costs one
    class-key lookup (what every call cost before it existed), not a trip through Triton.

A cache hit then skips Triton's ``CompiledKernel.__getitem__`` / runner / ``CudaLauncher.__call__`` layers and calls
the generated C launcher directly (:func:`_direct_launch`), but only on a Triton whose launcher layout was read and
checked here, only while no launch hook is registered (profilers such as proton register them), and only for kernels
that need no scratch memory; anything else goes through ``compiled[grid](...)``.
"""

from __future__ import annotations

import inspect

import torch
import triton

from ._backend import triton_interpreting

try:  # the hook chains Triton passes to its launcher (older Tritons have no triton.knobs)
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
except ImportError:
    _knobs = _HookChain = None

_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1
_BY_CLASS: dict = {}
_BY_VALUE: dict = {}
# far above the number of (kernel, shape, dtype, alignment, config) combinations a model launches (tens); reached
# only by inputs whose shapes keep changing, where each miss costs a class-key lookup
_BY_VALUE_MAX = 1024
_GRID_PAD = ((1, 1, 1), (1, 1), (1,), ())  # by len(grid): the grid dimensions left out, which are 1

# Triton's @triton.jit picks the interpreter when the kernel modules are imported (they also read the flag then), so
# the flag is read once here too rather than from os.environ on every launch.
_INTERPRETING = triton_interpreting()
# The current device, as torch.cuda.current_device() (what Triton's driver calls) minus its Python wrapper; the C
# function initialises CUDA itself. Absent from CPU builds of torch, which launch only under the interpreter.
_get_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
# The current stream of a device as Triton 3.6's CUDA driver gets it (GPUDriver.get_current_stream is this function
# when torch has it); without it there is no direct launch.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
# Triton versions whose compiled-kernel / launcher internals _direct_launch was checked against: CompiledKernel
# (run, function, packed_metadata), CudaLauncher (launch, launch_cooperative_grid, launch_pdl, scratch sizes, the
# __call__ signature) and the argument layout of the generated C launch function.
_VERIFIED_TRITON = ("3.6",)
_TRITON_VERIFIED = ".".join(triton.__version__.split(".")[:2]) in _VERIFIED_TRITON
_LAUNCHER_CALL_PARAMS = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). ``triton.cdiv`` is a constexpr function now, ~3 us of Python per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side smallest power of two >= n (1 for n <= 1); see :func:`cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _spec(a):
    """What Triton specialises a kernel on about the argument ``a`` (the class key's element for it)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, _I32_MIN <= a <= _I32_MAX, a <= _I64_MAX)
    if a is None or isinstance(a, float):
        return type(a)
    raise TypeError(f"matten_kernels._launch: unsupported kernel argument type {type(a).__name__}")


def _value_key(args) -> tuple:
    """The by-value key's elements for ``args``: an exact int stands for itself, a plain tensor and a float get
    :func:`_spec`'s element inline (the common cases, no function call), anything else goes through :func:`_spec`
    (bools, None, subclasses; unsupported types raise there). No element of one kind equals an element of another
    (an int is never equal to a tuple or a type, and bools go through ``_spec``'s ``("b", value)``), so equal keys mean
    equal class keys."""
    return tuple([a if (t := type(a)) is int else (a.dtype, a.data_ptr() % 16 == 0) if t is torch.Tensor
                  else float if t is float else _spec(a) for a in args])


def _hooks_idle() -> bool:
    """Whether a launch through Triton would call no launch hook: each hook is None or an empty HookChain (Triton 3.6
    passes its chains to the launcher even when empty; profilers add to them or replace them)."""
    rt = _knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return ((enter is None or type(enter) is _HookChain and not enter.calls)
            and (leave is None or type(leave) is _HookChain and not leave.calls))


def _direct_launch(compiled):
    """``(c_launch, function, cooperative, pdl, packed_metadata)`` to launch ``compiled`` without Triton's Python
    layers, or None when that cannot be done safely.

    On the verified Triton versions ``compiled[grid](*args)`` resolves the stream of the current device, calls
    ``CudaLauncher.__call__``, which allocates no scratch when the kernel needs none, and that calls the generated C
    function as ``launch(gridX, gridY, gridZ, stream, function, cooperative, pdl, global_scratch, profile_scratch,
    packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``; :func:`launch` makes that last call itself.
    Anything other than the checked shape (another Triton version, another backend's launcher, a changed ``__call__``
    signature, a missing attribute, a kernel that needs global or profile scratch memory) returns None, and the
    kernel is launched through ``compiled[grid]``."""
    if not _TRITON_VERIFIED or _raw_stream is None or _HookChain is None:
        return None
    try:
        runner = compiled.run
        cls = type(runner)
        if cls.__module__ != "triton.backends.nvidia.driver" or cls.__name__ != "CudaLauncher":
            return None
        if list(inspect.signature(cls.__call__).parameters) != _LAUNCHER_CALL_PARAMS:
            return None
        if runner.global_scratch_size or runner.profile_scratch_size or not callable(runner.launch):
            return None
        return (runner.launch, compiled.function, runner.launch_cooperative_grid, runner.launch_pdl,
                compiled.packed_metadata)
    except (AttributeError, TypeError, ValueError):  # an attribute missing, or a __call__ inspect cannot read
        return None


def _class_entry(kernel, grid, args, meta, device, value_key):
    """A call that missed ``_BY_VALUE``: returns the entry to launch with, or None when the kernel was launched here
    (through Triton: a new specialisation, or a kernel that is not cached)."""
    class_key = (kernel, device, tuple(map(_spec, args)), tuple(meta.items()))
    entry = _BY_CLASS.get(class_key)
    launched = entry is None
    if launched:
        compiled = kernel[grid](*args, **meta)
        names = [p.name for p in kernel.params[len(args):]]
        if any(n not in meta for n in names) or not hasattr(compiled, "__getitem__"):
            # a parameter left to its default value, or a Triton whose run() returns no compiled kernel: keep
            # Triton's own path for this kernel
            entry = False
        else:
            entry = (compiled, tuple(meta[n] for n in names), _direct_launch(compiled))
        _BY_CLASS[class_key] = entry
    if entry is False:
        if not launched:
            kernel[grid](*args, **meta)
        return None
    if len(_BY_VALUE) >= _BY_VALUE_MAX:
        _BY_VALUE.clear()
    _BY_VALUE[value_key] = entry
    return None if launched else entry


def launch(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)``, where ``args`` are the kernel's leading runtime parameters in order and
    ``meta`` names its remaining parameters (constexprs) plus optional ``num_warps`` / ``num_stages``."""
    if _INTERPRETING:
        kernel[grid](*args, **meta)
        return
    device = _get_device()
    # the kernel by id: hashing a JITFunction runs Python (its cache_key property). No other kernel can take that id
    # while the entry exists, since _BY_CLASS, which is never emptied, holds the kernel.
    key = (id(kernel), device, _value_key(args), tuple(meta.items()))
    entry = _BY_VALUE.get(key)
    if entry is None:
        entry = _class_entry(kernel, grid, args, meta, device, key)
        if entry is None:
            return
    compiled, tail, direct = entry
    if direct is not None and _hooks_idle():
        c_launch, function, cooperative, pdl, packed_metadata = direct
        c_launch(*grid, *_GRID_PAD[len(grid)], _raw_stream(device), function, cooperative, pdl, None, None,
                 packed_metadata, None, None, None, *args, *tail)
        return
    compiled[tuple(grid) + _GRID_PAD[len(grid)]](*args, *tail)

