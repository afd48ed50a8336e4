"""Public adaLN ops: validation, backend choice, torch.library custom ops with fake kernels and autograd.

``layer_norm_modulate`` and ``gated_residual`` are what every DiT/Latte/Matten block runs around its attention,
MLP and Mamba branches (shapes and semantics: reference.py). Fused, each is one pass over the tokens forward and
one backward, with the per-batch parameter gradients reduced inside the kernel. Layers as the other ops:
``triton_kernels.py`` (kernels + launchers) -> custom ops ``matten::layer_norm_modulate_fwd/_bwd`` and
``matten::gated_residual_fwd/_bwd`` (torch.compile) or the eager autograd.Function over the same launchers -> the
public functions below.
"""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES, check_tensor, choose_backend, use_custom_op
from .reference import gated_residual_ref, layer_norm_modulate_ref

BACKENDS = ("triton", "ref")


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("matten::layer_norm_modulate_fwd", mutates_args=())
def _ln_mod_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernels import ln_modulate_fwd_launch

    return ln_modulate_fwd_launch(x, shift, scale, eps, out_dtype)


@_ln_mod_fwd.register_fake
def _(x, shift, scale, eps, out_dtype):
    batch, T, D = x.shape
    return (x.new_empty((batch, T, D), dtype=out_dtype), x.new_empty((batch, T), dtype=torch.float32),
            x.new_empty((batch, T), dtype=torch.float32))


@torch.library.custom_op("matten::layer_norm_modulate_bwd", mutates_args=())
def _ln_mod_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernels import ln_modulate_bwd_launch

    return ln_modulate_bwd_launch(dy, x, scale, mean, rstd)


@_ln_mod_bwd.register_fake
def _(dy, x, scale, mean, rstd):
    f32 = scale.new_empty(scale.shape, dtype=torch.float32)
    return x.new_empty(x.shape), f32, f32.new_empty(f32.shape)


def _ln_mod_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    # Saved: x, scale and the per-token mean and 1/std (2 x 4 B a token); the normalised x is recomputed.
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.param_dtypes = (shift.dtype, scale.dtype)


def _ln_mod_grads(ctx, dy, bwd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = bwd(dy, x, scale, mean, rstd)
    return dx, dshift.to(ctx.param_dtypes[0]), dscale.to(ctx.param_dtypes[1]), None, None


_ln_mod_fwd.register_autograd(lambda ctx, dy, dmean, drstd: _ln_mod_grads(ctx, dy, _ln_mod_bwd),
                              setup_context=_ln_mod_setup)


@torch.library.custom_op("matten::gated_residual_fwd", mutates_args=())
def _gres_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from .triton_kernels import gated_residual_fwd_launch

    return gated_residual_fwd_launch(x, gate, y)


@_gres_fwd.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("matten::gated_residual_bwd", mutates_args=())
def _gres_bwd(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernels import gated_residual_bwd_launch

    return gated_residual_bwd_launch(dout, gate, y)


@_gres_bwd.register_fake
def _(dout, gate, y):
    return gate.new_empty(gate.shape, dtype=torch.float32), y.new_empty(y.shape)


def _gres_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)  # saved: the branch output y and the gate; the residual x is not needed
    ctx.dtypes = (x.dtype, gate.dtype)


def _gres_grads(ctx, dout, bwd):
    gate, y = ctx.saved_tensors
    dgate, dy = bwd(dout, gate, y)
    return dout.to(ctx.dtypes[0]), dgate.to(ctx.dtypes[1]), dy


_gres_fwd.register_autograd(lambda ctx, dout: _gres_grads(ctx, dout, _gres_bwd), setup_context=_gres_setup)


class _LayerNormModulate(torch.autograd.Function):
    """Eager path: the custom op's launchers without the torch.library dispatch layers (``use_custom_op``)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        from .triton_kernels import ln_modulate_fwd_launch

        y, mean, rstd = ln_modulate_fwd_launch(x, shift, scale, eps, out_dtype)
        _ln_mod_setup(ctx, (x, shift, scale, eps, out_dtype), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        from .triton_kernels import ln_modulate_bwd_launch

        return _ln_mod_grads(ctx, dy, ln_modulate_bwd_launch)


class _GatedResidual(torch.autograd.Function):
    """Eager path of :func:`gated_residual` (see :class:`_LayerNormModulate`)."""

    @staticmethod
    def forward(ctx, x, gate, y):
        from .triton_kernels import gated_residual_fwd_launch

        _gres_setup(ctx, (x, gate, y), None)
        return gated_residual_fwd_launch(x, gate, y)

    @staticmethod
    def backward(ctx, dout):
        from .triton_kernels import gated_residual_bwd_launch

        return _gres_grads(ctx, dout, gated_residual_bwd_launch)


# ---------------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------------


def _dtypes(backend: str) -> tuple:
    """fp32/fp16/bf16; the reference also takes float64 (models in double precision, tests)."""
    return FLOAT_DTYPES + (torch.float64,) if backend == "ref" else FLOAT_DTYPES


def _validate_tokens(op: str, name: str, t, backend: str) -> None:
    check_tensor(name, t, ndim=3, dtypes=_dtypes(backend), op=op)
    batch, T, D = t.shape
    if batch == 0 or T == 0 or D == 0:
        raise ValueError(f"{op}: {name} must have a non-empty batch, tokens and channels, got shape {tuple(t.shape)}")
    if D > 16384:
        raise ValueError(f"{op}: {name} has D = {D} channels; the kernels hold a token row in registers (D <= 16384)")
    if T * D >= 2 ** 31 or batch > 65535:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} is too large (tokens * D < 2^31, batch <= 65535)")


def _validate_params(op: str, x, backend: str, **params) -> None:
    batch, _, D = x.shape
    for name, p in params.items():
        check_tensor(name, p, ndim=2, dtypes=_dtypes(backend), device=x.device, shape=(batch, D), op=op)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
                        out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """LayerNorm without affine over the last dim, then the adaLN modulation, in one pass::

        y = (x - mean(x)) / sqrt(var(x) + eps) * (1 + scale) + shift

    x: (batch, tokens, D) fp32/fp16/bf16 (float64 on the ref backend); shift, scale: (batch, D), any float dtype, broadcast over the tokens.
    Returns (batch, tokens, D) in ``out_dtype`` (default x.dtype; a block under autocast passes the autocast dtype, so
    the GEMM that follows reads 2-byte values without a separate cast). fp32 arithmetic. Gradients flow to x, shift
    and scale (deterministic). ``backend``: None (triton for CUDA tensors, ref otherwise), "triton", "ref".
    """
    op = "layer_norm_modulate"
    check_tensor("x", x, op=op)
    backend = choose_backend(backend, x.device, op, available=BACKENDS)
    _validate_tokens(op, "x", x, backend)
    _validate_params(op, x, backend, shift=shift, scale=scale)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _dtypes(backend):
        raise TypeError(f"{op}: out_dtype must be one of {_dtypes(backend)}, got {out_dtype}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps!r}")
    if backend == "ref":
        return layer_norm_modulate_ref(x, shift, scale, eps, out_dtype)
    if use_custom_op():
        return _ln_mod_fwd(x, shift, scale, float(eps), out_dtype)[0]
    return _LayerNormModulate.apply(x, shift, scale, float(eps), out_dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *, backend: str | None = None
                   ) -> torch.Tensor:
    """``x + gate * y`` in one pass: the residual update of a gated (adaLN-Zero / M-AdaN) branch.

    x: (batch, tokens, D) residual stream; y: the branch output, same shape, any float dtype; gate: (batch, D)
    broadcast over the tokens. Returns x.dtype; fp32 arithmetic (the product is not rounded to y's dtype first).
    Gradients flow to x, gate and y (deterministic). ``backend``: as :func:`layer_norm_modulate`.
    """
    op = "gated_residual"
    check_tensor("x", x, op=op)
    backend = choose_backend(backend, x.device, op, available=BACKENDS)
    _validate_tokens(op, "x", x, backend)
    check_tensor("y", y, dtypes=_dtypes(backend), device=x.device, shape=tuple(x.shape), op=op)
    _validate_params(op, x, backend, gate=gate)
    if backend == "ref":
        return gated_residual_ref(x, gate, y)
    if use_custom_op():
        return _gres_fwd(x, gate, y)
    return _GatedResidual.apply(x, gate, y)
