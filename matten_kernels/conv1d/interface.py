"""Public depthwise conv1d + SiLU ops (the Mamba mixer's short convolution): validation, backend choice, custom ops.

Layers (STYLE.md): ``triton_fwd.py`` / ``triton_bwd.py`` hold the ``@triton.jit`` kernels and their launchers
(triton is imported only when an op first runs); this file registers them as ``torch.library`` custom ops
(``matten::depthwise_conv1d_silu_fwd/_bwd`` and ``matten::bi_depthwise_conv1d_silu_fwd/_bwd``) with fake kernels and
autograd, and holds the public functions, which validate every argument and dispatch to "triton" or "ref".
Semantics: reference.py.
"""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES, check_tensor, choose_backend, use_custom_op
from .reference import bi_depthwise_conv1d_silu_ref, depthwise_conv1d_silu_ref

BACKENDS = ("triton", "ref")
MAX_WIDTH = 4  # the backward kernel is written out for 4 taps (narrower widths pad with zero taps); Mamba uses 4


def new_output(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised (batch, channels, L) tensor in the memory order of x's fastest axis.

    Channel-fastest x (the transposed in_proj output) gives a (batch, L, channels)-contiguous output seen as
    (batch, channels, L): x_proj then reads it as a (batch*L, channels) matrix without a copy. Otherwise the output
    is contiguous (batch, channels, L). The launchers and the fake kernels both use it, so strides agree.
    """
    batch, channels, L = x.shape
    if x.stride(1) == 1 and channels > 1:
        return x.new_empty((batch, L, channels)).transpose(1, 2)
    return x.new_empty((batch, channels, L))


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile; the fake kernels give it shapes and strides)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("matten::depthwise_conv1d_silu_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv(x) + bias), layout of ``new_output(x)``."""
    from .triton_fwd import dwconv_silu_fwd_launch

    return dwconv_silu_fwd_launch(x, weight, bias)


@_conv_fwd.register_fake
def _(x, weight, bias):
    return new_output(x)


@torch.library.custom_op("matten::depthwise_conv1d_silu_bwd", mutates_args=())
def _conv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx like ``new_output(x)``, dweight (D, K) and dbias (D,) contiguous, own dtypes."""
    from .triton_bwd import dwconv_silu_bwd_launch

    return dwconv_silu_bwd_launch(dy, None, x, weight, bias)


@_conv_bwd.register_fake
def _(dy, x, weight, bias):
    return new_output(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _conv_setup(ctx, inputs, output):
    # Saved: the inputs only. The pre-activations are recomputed in the backward kernel (K taps a position), which
    # costs no extra DRAM traffic there, instead of keeping a (batch, D, L) fp32 tensor alive.
    ctx.save_for_backward(*inputs)


def _conv_grads(ctx, dy, bwd):
    x, weight, bias = ctx.saved_tensors
    return bwd(dy, x, weight, bias)


_conv_fwd.register_autograd(lambda ctx, dy: _conv_grads(ctx, dy, _conv_bwd), setup_context=_conv_setup)


@torch.library.custom_op("matten::bi_depthwise_conv1d_silu_fwd", mutates_args=())
def _bi_conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, weight_b: torch.Tensor,
                 bias_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_f, x_b), each in the layout of ``new_output(x)``; one pass over x."""
    from .triton_fwd import dwconv_silu_fwd_launch

    return dwconv_silu_fwd_launch(x, weight, bias, weight_b, bias_b)


@_bi_conv_fwd.register_fake
def _(x, weight, bias, weight_b, bias_b):
    return new_output(x), new_output(x)


@torch.library.custom_op("matten::bi_depthwise_conv1d_silu_bwd", mutates_args=())
def _bi_conv_bwd(dy: torch.Tensor, dy_b: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 weight_b: torch.Tensor, bias_b: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dweight_b, dbias_b), one pass; layouts as :func:`_conv_bwd`."""
    from .triton_bwd import dwconv_silu_bwd_launch

    return dwconv_silu_bwd_launch(dy, dy_b, x, weight, bias, weight_b, bias_b)


@_bi_conv_bwd.register_fake
def _(dy, dy_b, x, weight, bias, weight_b, bias_b):
    return (new_output(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape),
            weight_b.new_empty(weight_b.shape), bias_b.new_empty(bias_b.shape))


def _bi_conv_grads(ctx, dy, dy_b, bwd):
    x, weight, bias, weight_b, bias_b = ctx.saved_tensors
    # An output that does not reach the loss has no gradient; its direction then contributes nothing.
    if dy is None:
        dy = torch.zeros_like(x)
    if dy_b is None:
        dy_b = torch.zeros_like(x)
    return bwd(dy, dy_b, x, weight, bias, weight_b, bias_b)


_bi_conv_fwd.register_autograd(lambda ctx, dy, dy_b: _bi_conv_grads(ctx, dy, dy_b, _bi_conv_bwd),
                               setup_context=_conv_setup)


def _launch_bwd(dy, x, weight, bias):
    from .triton_bwd import dwconv_silu_bwd_launch

    return dwconv_silu_bwd_launch(dy, None, x, weight, bias)


def _launch_bi_bwd(dy, dy_b, x, weight, bias, weight_b, bias_b):
    from .triton_bwd import dwconv_silu_bwd_launch

    return dwconv_silu_bwd_launch(dy, dy_b, x, weight, bias, weight_b, bias_b)


class _ConvFunction(torch.autograd.Function):
    """Eager path of both ops (one or two directions): the same launchers as the custom ops, without the
    torch.library dispatch layers (``matten_kernels._backend.use_custom_op``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_b=None, bias_b=None):
        from .triton_fwd import dwconv_silu_fwd_launch

        inputs = (x, weight, bias) if weight_b is None else (x, weight, bias, weight_b, bias_b)
        _conv_setup(ctx, inputs, None)
        ctx.set_materialize_grads(False)
        return dwconv_silu_fwd_launch(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        if len(ctx.saved_tensors) == 3:
            return (*_conv_grads(ctx, grads[0], _launch_bwd), None, None)
        return _bi_conv_grads(ctx, *grads, _launch_bi_bwd)


# ---------------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------------


def _validate(op: str, x, weight, bias, suffix: str = "") -> None:
    """Raise a ValueError/TypeError naming the argument; x first (weight and bias are checked against it)."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, op=op)
    batch, channels, L = x.shape
    if batch == 0 or channels == 0 or L == 0:
        raise ValueError(f"{op}: x must have a non-empty batch, channels and L, got shape {tuple(x.shape)}")
    if max(channels * L, (channels - 1) * abs(x.stride(1)) + (L - 1) * abs(x.stride(2)) + 1) >= 2 ** 31:
        # the kernels index within one batch element in int32 (the batch offset is int64)
        raise ValueError(f"{op}: x spans >= 2^31 elements within one batch element (shape {tuple(x.shape)}, "
                         f"strides {x.stride()}); split the batch or the channels")
    param_dtypes = tuple(dict.fromkeys((torch.float32, x.dtype)))
    check_tensor("weight" + suffix, weight, ndim=2, dtypes=param_dtypes, device=x.device, op=op)
    check_tensor("weight" + suffix, weight, shape=(channels, None), op=op)
    if not 1 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"{op}: weight{suffix} has width k = {weight.shape[1]}; supported 1 <= k <= {MAX_WIDTH}")
    check_tensor("bias" + suffix, bias, dtypes=param_dtypes, device=x.device, shape=(channels,), op=op)


def depthwise_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                          backend: str | None = None) -> torch.Tensor:
    """Causal depthwise conv1d + bias + SiLU (Mamba's ``causal_conv1d_fn(..., activation="silu")``).

    x: (batch, channels, L), fp32/fp16/bf16, any strides (e.g. the x half of in_proj's output, transposed);
    weight: (channels, k), 1 <= k <= 4 (``conv1d.weight[:, 0, :]`` of an ``nn.Conv1d(groups=channels)``);
    bias: (channels,); weight and bias fp32 or x.dtype. Arithmetic in fp32.

        out[t] = silu(bias + sum_j weight[:, j] * x[:, t - (k-1) + j])          (x = 0 before position 0)

    Returns (batch, channels, L) in x.dtype; the triton backend lays it out (batch, L, channels)-contiguous when x's
    channel stride is 1, else contiguous. Gradients flow to x, weight and bias (deterministic).
    ``backend``: None (triton for CUDA tensors, ref otherwise), "triton" (CPU only under TRITON_INTERPRET=1), "ref".
    """
    op = "depthwise_conv1d_silu"
    _validate(op, x, weight, bias)
    backend = choose_backend(backend, x.device, op, available=BACKENDS)
    if backend == "ref":
        return depthwise_conv1d_silu_ref(x, weight, bias)
    return _conv_fwd(x, weight, bias) if use_custom_op() else _ConvFunction.apply(x, weight, bias)


def bi_depthwise_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, weight_b: torch.Tensor,
                             bias_b: torch.Tensor, *, backend: str | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of Vision Mamba's bidirectional short convolution in one pass over x, no flipped copies.

    Shapes and dtypes as :func:`depthwise_conv1d_silu`; (weight, bias) is the causal conv1d, (weight_b, bias_b) the
    backward direction's conv1d_b. Returns ``(x_f, x_b)``, each (batch, channels, L) in x.dtype::

        x_f = silu(causal_conv(x, weight) + bias)
        x_b = flip(silu(causal_conv(flip(x), weight_b) + bias_b))     (Vim: conv1d_b on the flipped sequence)
            i.e. x_b[t] = silu(bias_b + sum_i weight_b[:, k-1-i] * x[:, t+i])   (x = 0 past position L-1)

    both in natural order. Gradients flow to x and all four parameters (deterministic).
    ``backend``: None (triton for CUDA tensors, ref otherwise), "triton" (CPU only under TRITON_INTERPRET=1), "ref".
    """
    op = "bi_depthwise_conv1d_silu"
    _validate(op, x, weight, bias)
    _validate(op, x, weight_b, bias_b, suffix="_b")
    if weight_b.shape != weight.shape:
        raise ValueError(f"{op}: weight_b must have the shape of weight {tuple(weight.shape)}, "
                         f"got {tuple(weight_b.shape)}")
    backend = choose_backend(backend, x.device, op, available=BACKENDS)
    if backend == "ref":
        return bi_depthwise_conv1d_silu_ref(x, weight, bias, weight_b, bias_b)
    if use_custom_op():
        return _bi_conv_fwd(x, weight, bias, weight_b, bias_b)
    return _ConvFunction.apply(x, weight, bias, weight_b, bias_b)
