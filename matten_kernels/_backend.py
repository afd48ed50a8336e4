"""Backend selection and input validation shared by every op.

One short function picks the backend; the public functions call it and validate their inputs, so bad input
raises a ``ValueError``/``TypeError`` naming the argument before any kernel is launched.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("matten_kernels")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_custom_op() -> bool:
    """Whether a Triton op should go through its ``torch.library`` custom op rather than its eager
    autograd.Function: torch.compile traces the opaque custom ops (they have fake kernels), and eager code under a
    dispatch mode (FlopCounterMode, FakeTensorMode...) sees ops only through the dispatcher. Plain eager calls take
    the autograd.Function over the same launchers, which skips the custom-op dispatch layers (about as much host time
    again as the Python around the kernels: NOTES_attention.md)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on x computes in here: the autocast dtype when autocast is on for x's device, else x.dtype."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and x.dtype.is_floating_point and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def choose_backend(backend: str | None, device: torch.device, op: str, available=("triton", "ref")) -> str:
    """Resolve ``backend`` for tensors on ``device``.

    ``None`` means auto: ``"triton"`` for CUDA tensors, ``"ref"`` otherwise. ``"triton"`` on CPU tensors works only
    under ``TRITON_INTERPRET=1``. Anything else raises; nothing falls back silently.
    """
    if backend is None:
        chosen = "triton" if device.type == "cuda" and "triton" in available else "ref"
        if not torch.compiler.is_compiling():  # a log call inside a traced graph breaks fullgraph compilation
            logger.debug("%s: backend=None -> %r (tensors on %s)", op, chosen, device)
        return chosen
    if not isinstance(backend, str) or backend not in available:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected None or one of {list(available)}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got tensors on {device}); on the CPU it runs only under "
            "TRITON_INTERPRET=1 set before triton is imported. Use backend='ref' or backend=None for CPU tensors."
        )
    return backend


def check_tensor(name: str, t, *, ndim=None, dtypes=None, device=None, shape=None, op: str = "") -> None:
    """Raise a clear error naming ``name`` when ``t`` is not a tensor of the given rank, dtype, device or shape.

    ``shape`` may hold ``None`` entries for free dimensions.
    """
    where = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ndims:
            raise ValueError(f"{where}{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{where}{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{where}{name} is on {t.device}, expected {device} (all inputs on one device)")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{where}{name} must have shape {want}, got {tuple(t.shape)}")
