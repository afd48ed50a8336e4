"""Public entry points for video attention: validation, backend choice, then the reference or the Triton op.

Two entries, one set of kernels: ``video_attention(q, k, v)`` and ``video_attention_qkvpacked(qkv)``. The second
takes the packed ``(batch, F*S, 3, heads, head_dim)`` projection output (what the model has) and returns its
gradient as one packed tensor written by the backward kernel; through ``video_attention(*qkv.unbind(2))`` autograd
would stack three separate gradients into it instead (one more kernel and a copy of 3 x the activations).

Layers: ``triton_fwd.py`` / ``triton_bwd.py`` hold the kernels and their launchers (triton is imported only when
an op first runs); this file registers them as ``torch.library`` custom ops (``matten::video_attention_fwd`` /
``_bwd`` and their ``_qkvpacked`` twins) with fake kernels and autograd (what torch.compile sees), plus thin
autograd.Functions over the same launchers for eager calls, validates input and dispatches.
"""

from __future__ import annotations

import functools

import torch

from .._backend import FLOAT_DTYPES, check_tensor, choose_backend, use_custom_op
from .reference import video_attention_qkvpacked_ref, video_attention_ref

AXES = ("spatial", "temporal", "global")
MAX_HEAD_DIM = 128
_OP = "video_attention"


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile; the fake kernels give it shapes)
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _launchers():
    """(forward, backward) launchers, imported on first use: importing matten_kernels does not import triton, and
    later calls skip the import machinery."""
    from .triton_bwd import video_attention_bwd_launch
    from .triton_fwd import video_attention_fwd_launch

    return video_attention_fwd_launch, video_attention_bwd_launch


@torch.library.custom_op("matten::video_attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, axis: str, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o, lse): o (batch, F*S, heads, head_dim) contiguous; lse (batch, heads, F*S) fp32, base 2."""
    return _launchers()[0](q, k, v, num_frames, axis, softmax_scale)


@_attention_fwd.register_fake
def _(q, k, v, num_frames, axis, softmax_scale):
    batch, tokens, heads, head_dim = q.shape
    return (
        q.new_empty((batch, tokens, heads, head_dim)),
        q.new_empty((batch, heads, tokens), dtype=torch.float32),
    )


@torch.library.custom_op("matten::video_attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    num_frames: int,
    axis: str,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), each (batch, F*S, heads, head_dim) contiguous."""
    return _launchers()[1](do, q, k, v, o, lse, num_frames, axis, softmax_scale)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, num_frames, axis, softmax_scale):
    shape = tuple(q.shape)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)


def _setup_context(ctx, inputs, output):
    q, k, v, num_frames, axis, softmax_scale = inputs
    o, lse = output
    # Saved: the inputs (views, no copies), the output and the fp32 logsumexp (batch*heads*F*S floats). The
    # attention probabilities (L^2 per sequence) are recomputed in the backward from q, k and lse.
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.geometry = (num_frames, axis, softmax_scale)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    num_frames, axis, softmax_scale = ctx.geometry
    # lse is an auxiliary output; nothing upstream differentiates through it (grad_lse is None or unused).
    dq, dk, dv = _attention_bwd(grad_o, q, k, v, o, lse, num_frames, axis, softmax_scale)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _VideoAttentionFunction(torch.autograd.Function):
    """Eager path: the same launchers as the custom ops, without the torch.library dispatch layers (custom op
    __call__, autograd_impl, redispatch, the dynamo-disable wrapper), which on a CPU host cost about as much again as
    the rest of the Python around the kernels (NOTES_attention.md). torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, num_frames, axis, softmax_scale):
        o, lse = _launchers()[0](q, k, v, num_frames, axis, softmax_scale)
        # Saved: as in _setup_context (inputs, output, fp32 logsumexp); probabilities are recomputed.
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geometry = (num_frames, axis, softmax_scale)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _launchers()[1](grad_o, q, k, v, o, lse, *ctx.geometry)
        return dq, dk, dv, None, None, None


@torch.library.custom_op("matten::video_attention_qkvpacked_fwd", mutates_args=())
def _attention_packed_fwd(
    qkv: torch.Tensor, num_frames: int, axis: str, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``matten::video_attention_fwd`` on the slots of qkv (batch, F*S, 3, heads, head_dim), read in place."""
    return _launchers()[0](*qkv.unbind(2), num_frames, axis, softmax_scale)


@_attention_packed_fwd.register_fake
def _(qkv, num_frames, axis, softmax_scale):
    batch, tokens, _, heads, head_dim = qkv.shape
    return (
        qkv.new_empty((batch, tokens, heads, head_dim)),
        qkv.new_empty((batch, heads, tokens), dtype=torch.float32),
    )


@torch.library.custom_op("matten::video_attention_qkvpacked_bwd", mutates_args=())
def _attention_packed_bwd(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_frames: int, axis: str,
    softmax_scale: float,
) -> torch.Tensor:
    """Returns dqkv (batch, F*S, 3, heads, head_dim) contiguous."""
    return _launchers()[1](do, *qkv.unbind(2), o, lse, num_frames, axis, softmax_scale, packed=True)


@_attention_packed_bwd.register_fake
def _(do, qkv, o, lse, num_frames, axis, softmax_scale):
    return qkv.new_empty(tuple(qkv.shape))


def _setup_context_packed(ctx, inputs, output):
    qkv, num_frames, axis, softmax_scale = inputs
    ctx.save_for_backward(qkv, *output)  # the packed input (no copy), o, lse: as _setup_context
    ctx.geometry = (num_frames, axis, softmax_scale)


def _backward_packed(ctx, grad_o, grad_lse):
    qkv, o, lse = ctx.saved_tensors
    return _attention_packed_bwd(grad_o, qkv, o, lse, *ctx.geometry), None, None, None


_attention_packed_fwd.register_autograd(_backward_packed, setup_context=_setup_context_packed)


class _VideoAttentionQKVPackedFunction(torch.autograd.Function):
    """Eager path of ``video_attention_qkvpacked`` (see _VideoAttentionFunction)."""

    @staticmethod
    def forward(ctx, qkv, num_frames, axis, softmax_scale):
        o, lse = _launchers()[0](*qkv.unbind(2), num_frames, axis, softmax_scale)
        ctx.save_for_backward(qkv, o, lse)
        ctx.geometry = (num_frames, axis, softmax_scale)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        qkv, o, lse = ctx.saved_tensors
        num_frames, axis, softmax_scale = ctx.geometry
        dqkv = _launchers()[1](grad_o, *qkv.unbind(2), o, lse, num_frames, axis, softmax_scale, packed=True)
        return dqkv, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------------------


_VALID_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _looks_valid(q, k, v, num_frames, axis, softmax_scale) -> bool:
    """The checks of ``_validate`` as one expression, for the common valid call (about 1 us instead of 6 on a CPU
    host, per call of the eager path); False sends the call through the detailed checks, which name the argument."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    shape, dtype, device = q.shape, q.dtype, q.device
    return (
        len(shape) == 4 and dtype in _VALID_DTYPES and k.dtype is dtype and v.dtype is dtype
        and k.shape == shape and v.shape == shape and k.device == device and v.device == device
        and axis in AXES and type(num_frames) is int and num_frames > 0 and shape[1] % num_frames == 0
        and 0 < shape[3] <= MAX_HEAD_DIM and shape[0] > 0 and shape[1] > 0 and shape[2] > 0
        and (softmax_scale is None or isinstance(softmax_scale, (int, float)))
    )


def _validate(q, k, v, num_frames, axis, softmax_scale):
    """Raise a clear ValueError/TypeError for bad input."""
    if _looks_valid(q, k, v, num_frames, axis, softmax_scale):
        return
    check_tensor("q", q, ndim=4, dtypes=_VALID_DTYPES, op=_OP)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device, shape=tuple(q.shape), op=_OP)
    _validate_geometry(q.shape, num_frames, axis, softmax_scale, "q", _OP)


def _validate_packed(qkv, num_frames, axis, softmax_scale):
    """As ``_validate``, for a packed qkv (batch, F*S, 3, heads, head_dim)."""
    op = "video_attention_qkvpacked"
    check_tensor("qkv", qkv, ndim=5, dtypes=_VALID_DTYPES, op=op)
    if qkv.shape[2] != 3:
        raise ValueError(f"{op}: qkv must be (batch, F*S, 3, heads, head_dim), got shape {tuple(qkv.shape)}")
    shape = qkv.shape
    _validate_geometry((shape[0], shape[1], shape[3], shape[4]), num_frames, axis, softmax_scale, "qkv", op)


def _validate_geometry(shape, num_frames, axis, softmax_scale, name, op):
    """Checks shared by both entries; ``shape`` is (batch, F*S, heads, head_dim) of one of q, k, v."""
    batch, tokens, heads, head_dim = shape
    if axis not in AXES:
        raise ValueError(f"{op}: unknown axis {axis!r}; expected one of {list(AXES)}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"{op}: num_frames must be a positive int, got {num_frames!r}")
    if tokens % num_frames != 0:
        raise ValueError(
            f"{op}: the token count F*S = {name}.shape[1] = {tokens} is not divisible by num_frames={num_frames}"
        )
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim = {name}.shape[-1] must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if batch < 1 or tokens < 1 or heads < 1:
        raise ValueError(f"{op}: {name} must have non-empty batch, token and head dims, got shape {tuple(shape)}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")


def video_attention(q, k, v, *, num_frames, axis, softmax_scale=None, backend=None):
    """Softmax attention among the tokens of a frame, of a spatial position, or of the whole clip.

    Args:
        q, k, v: ``(batch, F*S, heads, head_dim)`` frame-major tokens (index ``f*S + s``), fp32/fp16/bf16 (fp64 on
            the reference only), all the same shape, dtype and device. They may be strided views of a packed
            ``(batch, F*S, 3, heads, head_dim)`` projection output: the Triton kernels read them through their
            strides, with no copies. head_dim <= 128.
        num_frames: F; ``q.shape[1]`` must be divisible by it (S = F*S / F, S = 1 and F = 1 allowed).
        axis: ``"spatial"`` (attend among the S tokens of each frame), ``"temporal"`` (among the F tokens at each
            spatial position) or ``"global"`` (among all F*S tokens).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: ``None`` (auto: ``"triton"`` for CUDA tensors, ``"ref"`` otherwise), ``"triton"`` (CUDA, or the CPU
            under ``TRITON_INTERPRET=1``), or ``"ref"`` (plain PyTorch, fp32 softmax).

    Returns:
        ``(batch, F*S, heads, head_dim)`` contiguous, dtype of q. Differentiable in q, k and v.

    Numerics (Triton): fp32 accumulation and online softmax; the logsumexp is saved and the backward recomputes the
    probabilities. For fp32 inputs on a GPU the matmuls run in 3xTF32 (fp32-level accuracy; plain tf32 biases the
    gradients, see ``triton_fwd.dot_precision``); the interpreter uses ieee fp32.
    """
    _validate(q, k, v, num_frames, axis, softmax_scale)
    chosen = choose_backend(backend, q.device, _OP)
    if chosen == "ref":
        return video_attention_ref(q, k, v, num_frames=num_frames, axis=axis, softmax_scale=softmax_scale)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: backend='triton' supports {[str(d) for d in FLOAT_DTYPES]}, got {q.dtype}")
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if use_custom_op():
        return _attention_fwd(q, k, v, num_frames, axis, scale)[0]
    return _VideoAttentionFunction.apply(q, k, v, num_frames, axis, scale)


def video_attention_qkvpacked(qkv, *, num_frames, axis, softmax_scale=None, backend=None):
    """:func:`video_attention` on a packed projection: ``qkv`` is ``(batch, F*S, 3, heads, head_dim)`` (any strides;
    slots 0, 1, 2 are q, k, v), as the model's qkv Linear produces it after a view.

    Same numerics, backends and output as ``video_attention(*qkv.unbind(2), ...)``; the difference is the backward:
    the gradient of qkv is one contiguous ``(batch, F*S, 3, heads, head_dim)`` tensor whose three slots the Triton
    backward writes directly, where the unbind route makes autograd stack three separate gradients (an extra kernel
    and 3 x the activations copied, plus host time per call).
    """
    if not (isinstance(qkv, torch.Tensor) and qkv.dim() == 5 and qkv.shape[2] == 3 and qkv.dtype in _VALID_DTYPES
            and axis in AXES and type(num_frames) is int and num_frames > 0 and qkv.shape[1] % num_frames == 0
            and 0 < qkv.shape[4] <= MAX_HEAD_DIM and qkv.numel() > 0
            and (softmax_scale is None or isinstance(softmax_scale, (int, float)))):
        _validate_packed(qkv, num_frames, axis, softmax_scale)
    chosen = choose_backend(backend, qkv.device, "video_attention_qkvpacked")
    if chosen == "ref":
        return video_attention_qkvpacked_ref(qkv, num_frames=num_frames, axis=axis, softmax_scale=softmax_scale)
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"video_attention_qkvpacked: backend='triton' supports {[str(d) for d in FLOAT_DTYPES]}, "
                        f"got {qkv.dtype}")
    scale = float(qkv.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if use_custom_op():
        return _attention_packed_fwd(qkv, num_frames, axis, scale)[0]
    return _VideoAttentionQKVPackedFunction.apply(qkv, num_frames, axis, scale)
