"""Public selective-scan ops: validation, backend dispatch, docstrings.

Layers (STYLE.md): ``triton_fwd.py`` / ``triton_bwd.py`` hold the ``@triton.jit`` kernels and their launchers;
``_ops.py`` registers them as ``torch.library`` custom ops (``matten::*``) with fake kernels and autograd; this file
is the public face: it validates every argument (a clear ``ValueError``/``TypeError`` naming it) and dispatches to
``"triton"``, ``"cuda"`` (the extension in ``csrc/``, see ``cuda.py``) or ``"ref"`` (``reference.py``).
Semantics: SPEC.md section 2.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .._backend import FLOAT_DTYPES, check_tensor, choose_backend
from . import cuda
from .reference import bi_selective_scan_ref, selective_scan_ref

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "cuda", "ref")
MAX_DSTATE = 256


def scan_backend(backend, device: torch.device, N: int, L: int, op: str) -> str:
    """Resolve ``backend`` for a scan of N states over L steps on ``device``: :func:`choose_backend`'s rule (None:
    triton for CUDA tensors, ref otherwise), except that None takes the CUDA extension where
    :func:`cuda.auto_takes` says so (installed ahead of time, and a shape its lanes kernels serve faster)."""
    chosen = choose_backend(backend, device, op, available=BACKENDS)
    if backend is None and chosen == "triton" and cuda.auto_takes(N, L):
        chosen = "cuda"
        if not torch.compiler.is_compiling():  # a log call inside a traced graph breaks fullgraph compilation
            logger.debug("%s: backend=None -> 'cuda' (prebuilt extension; N = %d <= 16, L = %d >= 256)", op, N, L)
    return chosen


def _validate(op, u, delta, A, B, C, D, z, delta_bias, initial_state, suffix=""):
    """Check one direction's inputs against u; raise ValueError/TypeError naming the argument."""
    s = suffix
    check_tensor("u" + s, u, ndim=3, dtypes=FLOAT_DTYPES, op=op)
    batch, dim, L = u.shape
    dev, dt = u.device, u.dtype
    if L == 0:
        raise ValueError(f"{op}: u{s} has sequence length L == 0 (shape {tuple(u.shape)}); L must be >= 1")
    if batch == 0 or dim == 0:
        raise ValueError(f"{op}: u{s} has an empty batch or dim (shape {tuple(u.shape)})")
    check_tensor("delta" + s, delta, dtypes=(dt,), device=dev, shape=(batch, dim, L), op=op)
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A{s} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype != torch.float32:
        raise TypeError(f"{op}: A{s} must be float32 (real), got {A.dtype}")
    check_tensor("A" + s, A, ndim=2, device=dev, shape=(dim, None), op=op)
    N = A.shape[1]
    if not 1 <= N <= MAX_DSTATE:
        raise ValueError(f"{op}: A{s} has state size N = {N}; supported 1 <= N <= {MAX_DSTATE}")
    for name, X in (("B" + s, B), ("C" + s, C)):
        check_tensor(name, X, ndim=(3, 4), dtypes=(dt,), device=dev, op=op)
        if X.dim() == 3:
            check_tensor(name, X, shape=(batch, N, L), op=op)
        else:
            G = X.shape[1]
            check_tensor(name, X, shape=(batch, None, N, L), op=op)
            if G == 0 or dim % G != 0:
                raise ValueError(f"{op}: {name} has G = {G} groups, but dim = {dim} is not a multiple of G")
    for name, X in (("D" + s, D), ("delta_bias" + s, delta_bias)):
        if X is not None:
            check_tensor(name, X, dtypes=(torch.float32,), device=dev, shape=(dim,), op=op)
    if z is not None:
        check_tensor("z", z, dtypes=(dt,), device=dev, shape=(batch, dim, L), op=op)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, dtypes=(torch.float32,), device=dev, shape=(batch, dim, N), op=op)


def _check_flag(op, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, backend=None):
    """Selective scan (Mamba S6), a drop-in for ``mamba_ssm.selective_scan_fn`` plus initial/last state gradients.

    Shapes: u, delta, z: (batch, dim, L); A: (dim, N) fp32, 1 <= N <= 256; B, C: (batch, N, L) or grouped
    (batch, G, N, L) with dim % G == 0; D, delta_bias: (dim,) fp32; initial_state: (batch, dim, N) fp32.
    u, delta, B, C, z share one dtype (fp32, fp16 or bf16). Non-contiguous inputs are accepted.

    Semantics (SPEC.md section 2), all in fp32::

        d_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
        h_t = exp(d_t * A) * h_{t-1} + d_t * B_t * u_t,  h_{-1} = initial_state or 0
        y_t = <C_t, h_t> + D * u_t;  out_t = y_t * silu(z_t) if z is given

    Returns ``out`` (batch, dim, L) in u.dtype, or ``(out, last_state)`` with ``return_last_state``, last_state =
    h_{L-1} (batch, dim, N) fp32. Gradients flow to every tensor input, initial_state and last_state included.

    ``backend``: None (auto), "triton", "cuda" or "ref". Auto: ref for CPU tensors; for CUDA tensors the CUDA
    extension where it was installed ahead of time (``MATTEN_BUILD_CUDA=1 pip install -e . --no-build-isolation``)
    and the shape is one its lanes kernels serve (N <= 16, L >= 256, outside deterministic mode: measured faster
    there), else triton (:func:`scan_backend`). The choice is logged at DEBUG level on the ``matten_kernels`` logger.
    Determinism: the gradients that are sums over channel tiles, batch rows or sequence segments (dB, dC, dA; with
    the Triton backend dD and ddelta_bias too) are added with fp32 atomics (fast, not bit-reproducible); under
    ``torch.use_deterministic_algorithms(True)`` partial sums are kept and summed in a fixed order instead
    (bit-identical runs; more memory, e.g. n_tiles x batch x N x L fp32 for dB/dC). All other gradients are
    deterministic either way.
    """
    op = "selective_scan"
    _validate(op, u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_flag(op, "delta_softplus", delta_softplus)
    _check_flag(op, "return_last_state", return_last_state)
    backend = scan_backend(backend, u.device, A.shape[1], u.shape[-1], op)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state)
    if backend == "cuda":
        return cuda.cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                    return_last_state, initial_state=initial_state)
    from ._ops import triton_selective_scan

    return triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                 initial_state=initial_state)


def bi_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                      u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                      divide_out=False, backend=None):
    """Bidirectional selective scan (Vision Mamba "bimamba" v1/v2) in one pass, no flipped copies.

    The forward direction scans t = 0 .. L-1 over (u, delta, A, B, C, D, delta_bias); the backward direction scans
    t = L-1 .. 0 over (u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b), given in natural order; a missing ``*_b``
    input is its forward twin (Vim v1: only A_b; v2: all of them). Shapes and dtypes as :func:`selective_scan`
    (the ``*_b`` tensors like their twins; B_b/C_b may use their own group count).

        out = (y_f + y_b) [/ 2 if divide_out] [* silu(z)]     (batch, dim, L) in u.dtype

    Gradients flow to every tensor input of both directions (into the forward twin where a ``*_b`` is missing).
    ``backend``: None, "triton", "cuda" or "ref" as for :func:`selective_scan` (determinism likewise).
    """
    op = "bi_selective_scan"
    _validate(op, u, delta, A, B, C, D, z, delta_bias, None)
    for name, Xb, X in (("u_b", u_b, u), ("delta_b", delta_b, delta), ("A_b", A_b, A)):
        if isinstance(Xb, torch.Tensor) and Xb.shape != X.shape:
            raise ValueError(f"{op}: {name} must have the shape of its forward twin {tuple(X.shape)}, "
                             f"got {tuple(Xb.shape)}")
    twin = lambda b, f: f if b is None else b  # noqa: E731
    _validate(op, twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C), twin(D_b, D), z,
              twin(delta_bias_b, delta_bias), None, suffix="_b")
    _check_flag(op, "delta_softplus", delta_softplus)
    _check_flag(op, "divide_out", divide_out)
    backend = scan_backend(backend, u.device, A.shape[1], u.shape[-1], op)
    kwargs = dict(u_b=u_b, delta_b=delta_b, A_b=A_b, B_b=B_b, C_b=C_b, D_b=D_b, delta_bias_b=delta_bias_b,
                  divide_out=divide_out)
    if backend == "ref":
        return bi_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kwargs)
    L = u.shape[-1]
    if L % BI_ALIGN and u.device.type in BI_PAD_DEVICES:
        # Rows whose length is not a multiple of 16 elements cost both backends their vectorised paths: the BiMamba
        # mixer at L = 4097 took 28.4 ms fwd+bwd against 7.7 (Triton) / 6.0 (CUDA) at 4096 (H100, bf16;
        # benchmarks/NOTES_scan.md "Session 8, last"). Steps appended with u = 0 are exact: the forward direction
        # reaches them after every real step, and the backward direction starts in them with a zero state that
        # u = 0 keeps at zero; their outputs (and dout = 0 there) are cut off.
        Lp = L + BI_ALIGN - L % BI_ALIGN
        if not torch.compiler.is_compiling():  # (a cached logging call is not traceable)
            _log_bi_padding(L, Lp)
        pad = lambda X: None if X is None else F.pad(X, (0, Lp - L))  # noqa: E731
        u, delta, B, C, z = map(pad, (u, delta, B, C, z))
        for k in ("u_b", "delta_b", "B_b", "C_b"):
            kwargs[k] = pad(kwargs[k])
        return bi_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=backend,
                                 **kwargs)[..., :L]
    if backend == "cuda":
        return cuda.cuda_bi_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kwargs)
    from ._ops import triton_bi_selective_scan

    return triton_bi_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kwargs)


BI_ALIGN = 16  # bi_selective_scan pads L to a multiple of this on the kernel backends,
BI_PAD_DEVICES = ("cuda",)  # on these devices (the CPU interpreter gains nothing; a test adds "cpu")


@functools.lru_cache(maxsize=None)
def _log_bi_padding(L: int, Lp: int) -> None:
    logger.info("bi_selective_scan: L = %d padded to %d (rows of a multiple of 16 elements keep the kernels "
                "vectorised; the appended steps have u = 0 and are exact)", L, Lp)
