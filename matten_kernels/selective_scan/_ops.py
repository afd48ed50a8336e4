"""torch.library custom ops over the Triton selective-scan kernels, with fake kernels and autograd.

    matten::selective_scan_fwd     (u, delta, A, B, C, D?, z?, delta_bias?, initial_state?, softplus)
                                   -> out, last_state, states
    matten::selective_scan_bwd     -> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
    matten::bi_selective_scan_fwd  (..., u_b?, delta_b?, A_b?, B_b?, C_b?, D_b?, delta_bias_b?, softplus, divide_out)
                                   -> out, states, states_b
    matten::bi_selective_scan_bwd  -> the gradients of all 15 tensor inputs

Custom-op outputs cannot be None: a gradient that does not exist (input not given, or a ``*_b`` shared with its
forward twin, whose gradient then already holds both directions) is returned as an empty tensor and mapped back to
None in the autograd formula. Being opaque custom ops with fake kernels, they trace under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import Tensor

from .._backend import use_custom_op
from .triton_bwd import selective_scan_bwd
from .triton_bwd_lanes import (bi_selective_scan_bwd_lanes, lanes_save_steps, selective_scan_bwd_lanes,
                               use_lanes_bi_bwd, use_lanes_bwd)
from .triton_fwd import SAVE_STEPS, kept_states, saved_layout, selective_scan_fwd, time_contiguous
from .triton_fwd_lanes import bi_selective_scan_fwd_lanes, selective_scan_fwd_lanes, use_lanes, use_lanes_bi

logger = logging.getLogger("matten_kernels")
_BI_NAMES = ("u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b")


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _c(x):
    """Small per-channel tensors (A, D, delta_bias, states) are indexed as contiguous by the kernels."""
    return None if x is None else x.contiguous()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _or_none(t: Tensor, present: bool):
    return t if present else None


# ---------------------------------------------------------------------------------------------------------------
# unidirectional


def _save_steps(u, B, C, N: int) -> int:
    """The spacing of the states the forward saves: the lanes backward's window where :func:`use_lanes_bwd` says
    that kernel will read them (it reads no others), else SAVE_STEPS (what the segment backward reads)."""
    if use_lanes_bwd(u, N, u.device.index if u.is_cuda else None):
        return lanes_save_steps(u, B, C)
    return SAVE_STEPS


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """Either forward kernel (same outputs and saved states, so the same backward): the lanes kernel where
    :func:`use_lanes` says it is the faster one (long 16-bit sequences over many channels), else the segments.
    Either saves the states every :func:`_save_steps` steps."""
    with _device_guard(u):
        u, delta, z = map(time_contiguous, (u, delta, z))
        save = _save_steps(u, B, C, A.shape[1])
        if use_lanes(u, delta, z, A.shape[1], u.device.index if u.is_cuda else None):
            return selective_scan_fwd_lanes(u, delta, _c(A), B, C, _c(D), z, _c(delta_bias), _c(initial_state),
                                            delta_softplus, save=save)
        out, last_state, states, _ = selective_scan_fwd(u, delta, _c(A), B, C, _c(D), z, _c(delta_bias),
                                                        _c(initial_state), delta_softplus, save=save)
    return out, last_state, states


def _scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states, delta_softplus):
    """Either backward kernel (the same gradients, from the same saved states): the lanes kernel where
    :func:`use_lanes_bwd` says it is the faster one (long 16-bit sequences over many channels), else the segments."""
    with _device_guard(u):
        dout, u, delta, z = map(time_contiguous, (dout, u, delta, z))
        if use_lanes_bwd(u, A.shape[1], u.device.index if u.is_cuda else None):
            g = selective_scan_bwd_lanes(dout, _c(dlast_state), u, delta, _c(A), B, C, _c(D), z, _c(delta_bias),
                                         initial_state, states, delta_softplus)
        else:
            if saved_layout(states, u.shape[2])[0] != SAVE_STEPS:
                # saved for the lanes backward, which use_lanes_bwd no longer takes: torch's deterministic mode
                # was turned on after the forward. The segment backward reads a state every SAVE_STEPS steps.
                logger.warning("selective_scan backward: deterministic mode was turned on after the forward, "
                               "whose states were saved for the (atomic) lanes backward; running the forward "
                               "again to save them every %d steps for the deterministic segment backward",
                               SAVE_STEPS)
                states = selective_scan_fwd(u, delta, _c(A), B, C, _c(D), z, _c(delta_bias), _c(initial_state),
                                            delta_softplus)[2]
            g = selective_scan_bwd(dout, _c(dlast_state), u, delta, _c(A), B, C, _c(D), z, _c(delta_bias),
                                   initial_state, states, delta_softplus)
    return tuple(_empty(u) if g[k] is None else g[k] for k in
                 ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"))


@torch.library.custom_op("matten::selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                          delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = kept_states(L, _save_steps(u, B, C, N))
    return (u.new_empty(u.shape), u.new_empty((batch, dim, N), dtype=torch.float32),
            u.new_empty((batch, dim, n_chunks, N), dtype=torch.float32))


@torch.library.custom_op("matten::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(dout: Tensor, dlast_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                          B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                          delta_bias: Optional[Tensor], initial_state: Optional[Tensor], states: Tensor,
                          delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                         Tensor, Tensor]:
    return _scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states, delta_softplus)


@selective_scan_bwd_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states, delta_softplus):
    f32 = lambda x: x.new_empty(x.shape, dtype=torch.float32) if x is not None else _empty(u)  # noqa: E731
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), f32(A), B.new_empty(B.shape), C.new_empty(C.shape),
            f32(D), z.new_empty(z.shape) if z is not None else _empty(u), f32(delta_bias), f32(initial_state))


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    _, _, states = output
    # Saved: the inputs and the fp32 state every _save_steps steps (64, or the lanes backward's 128 or 256), the
    # first (initial_state or zero) only in rows of 1024+ steps: (batch, dim, kept_states(L, save), N). Recomputed
    # in the backward: the states inside each chunk, y (for dz) and softplus(delta). Never a (batch, dim, L, N)
    # tensor.
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states)
    ctx.delta_softplus = delta_softplus


def _scan_grads(ctx, dout, dlast_state, bwd):
    u, delta, A, B, C, D, z, delta_bias, initial_state, states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                                     initial_state, states, ctx.delta_softplus)
    return (du, ddelta, dA, dB, dC, _or_none(dD, D is not None), _or_none(dz, z is not None),
            _or_none(dbias, delta_bias is not None), _or_none(dh0, initial_state is not None), None)


selective_scan_fwd_op.register_autograd(
    lambda ctx, dout, dlast_state, dstates: _scan_grads(ctx, dout, dlast_state, selective_scan_bwd_op),
    setup_context=_scan_setup_context)


class _ScanFunction(torch.autograd.Function):
    """Eager path: the same launchers as the custom ops without the torch.library dispatch layers, which cost
    about as much host time again as the Python around the kernels (measured for attention: NOTES_attention.md;
    the scan is launched the same way). torch.compile and dispatch modes (FlopCounterMode...) use the custom ops."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        out, last_state, states = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
        _scan_setup_context(ctx, (u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus),
                            (out, last_state, states))
        ctx.set_materialize_grads(False)  # an unused last_state gets None, not a zero tensor to read
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast_state):
        return _scan_grads(ctx, dout, dlast_state, _scan_bwd)


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, initial_state=None):
    """The Triton backend of :func:`matten_kernels.selective_scan` (inputs already validated)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
    if use_custom_op():
        out, last_state, _ = selective_scan_fwd_op(*args)
    else:
        out, last_state = _ScanFunction.apply(*args)
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------------------------------------------------------
# bidirectional


def _bi_lanes_window(u, B, C, B_b, C_b, N: int) -> Optional[int]:
    """The lanes backward's window where :func:`use_lanes_bi_bwd` takes the bidirectional backward, else None."""
    B_b, C_b = B if B_b is None else B_b, C if C_b is None else C_b
    if use_lanes_bi_bwd(u, B, C, B_b, C_b, N, u.device.index if u.is_cuda else None):
        return lanes_save_steps(u, B, C)
    return None


def _bi_save_steps(u, B, C, B_b, C_b, N: int) -> int:
    """The spacing of both directions' saved states: the lanes backward's window where that kernel will read them
    (:func:`_bi_lanes_window`), else SAVE_STEPS (what the segment backward reads)."""
    return _bi_lanes_window(u, B, C, B_b, C_b, N) or SAVE_STEPS


def _bi_fwd(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus,
            divide_out):
    """Either forward kernel (the same outputs and saved states, so the same backward): the lanes kernel, one launch
    a direction, where :func:`use_lanes_bi` takes both directions' rows, else the segments (one launch). Either
    saves the states every :func:`_bi_save_steps` steps."""
    with _device_guard(u):
        u_l, delta_l, z_l = map(time_contiguous, (u, delta, z))
        u_bl, delta_bl = (time_contiguous(x) if x is not None else y for x, y in ((u_b, u_l), (delta_b, delta_l)))
        save = _bi_save_steps(u_l, B, C, B_b, C_b, A.shape[1])
        if use_lanes_bi(u_l, delta_l, u_bl, delta_bl, z_l, A.shape[1], u.device.index if u.is_cuda else None):
            twin = lambda b, f: f if b is None else b  # noqa: E731
            return bi_selective_scan_fwd_lanes(
                u_l, delta_l, _c(A), B, C, _c(D), z_l, _c(delta_bias), u_bl, delta_bl, _c(twin(A_b, A)),
                twin(B_b, B), twin(C_b, C), _c(twin(D_b, D)), _c(twin(delta_bias_b, delta_bias)), delta_softplus,
                divide_out, save=save)
        out, _, states, states_b = selective_scan_fwd(
            u, delta, _c(A), B, C, _c(D), z, _c(delta_bias), None, delta_softplus, u_b=u_b, delta_b=delta_b,
            A_b=_c(A_b), B_b=B_b, C_b=C_b, D_b=_c(D_b), delta_bias_b=_c(delta_bias_b), bidirectional=True,
            divide_out=divide_out, save=save)
    return out, states, states_b


@torch.library.custom_op("matten::bi_selective_scan_fwd", mutates_args=())
def bi_selective_scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                             z: Optional[Tensor], delta_bias: Optional[Tensor], u_b: Optional[Tensor],
                             delta_b: Optional[Tensor], A_b: Optional[Tensor], B_b: Optional[Tensor],
                             C_b: Optional[Tensor], D_b: Optional[Tensor], delta_bias_b: Optional[Tensor],
                             delta_softplus: bool, divide_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bi_fwd(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                   delta_softplus, divide_out)


@bi_selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus,
      divide_out):
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = kept_states(L, _bi_save_steps(u, B, C, B_b, C_b, N))
    states = u.new_empty((batch, dim, n_chunks, N), dtype=torch.float32)
    return u.new_empty(u.shape), states, states.new_empty(states.shape)


_BI_GRAD_ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias") + _BI_NAMES


def _bi_bwd(dout, u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, states,
            states_b, delta_softplus, divide_out):
    """Either backward kernel: the lanes kernel, one launch a direction, where :func:`_bi_lanes_window` takes the
    backward and the states were saved for it, else the segments (one launch)."""
    with _device_guard(u):
        N, L = A.shape[1], u.shape[2]
        save = saved_layout(states, L)[0]
        bi = dict(u_b=u_b, delta_b=delta_b, A_b=_c(A_b), B_b=B_b, C_b=C_b, D_b=_c(D_b), delta_bias_b=_c(delta_bias_b))
        if save == _bi_lanes_window(u, B, C, B_b, C_b, N):
            dout, u, delta, z = map(time_contiguous, (dout, u, delta, z))
            g = bi_selective_scan_bwd_lanes(dout, u, delta, _c(A), B, C, _c(D), z, _c(delta_bias),
                                            time_contiguous(u_b), time_contiguous(delta_b), bi["A_b"], B_b, C_b,
                                            bi["D_b"], bi["delta_bias_b"], states, states_b, delta_softplus,
                                            divide_out)
        else:
            if save != SAVE_STEPS:  # as in _scan_bwd: deterministic mode turned on after the forward
                logger.warning("bi_selective_scan backward: deterministic mode was turned on after the forward, "
                               "whose states were saved for the (atomic) lanes backward; running the forward "
                               "again to save them every %d steps for the deterministic segment backward",
                               SAVE_STEPS)
                _, _, states, states_b = selective_scan_fwd(
                    u, delta, _c(A), B, C, _c(D), z, _c(delta_bias), None, delta_softplus, bidirectional=True,
                    divide_out=divide_out, **bi)
            g = selective_scan_bwd(dout, None, u, delta, _c(A), B, C, _c(D), z, _c(delta_bias), None, states,
                                   delta_softplus, states_b=states_b, bidirectional=True, divide_out=divide_out, **bi)
    return [_empty(u) if g[k] is None else g[k] for k in _BI_GRAD_ORDER]


@torch.library.custom_op("matten::bi_selective_scan_bwd", mutates_args=())
def bi_selective_scan_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                             u_b: Optional[Tensor], delta_b: Optional[Tensor], A_b: Optional[Tensor],
                             B_b: Optional[Tensor], C_b: Optional[Tensor], D_b: Optional[Tensor],
                             delta_bias_b: Optional[Tensor], states: Tensor, states_b: Tensor,
                             delta_softplus: bool, divide_out: bool) -> list[Tensor]:
    return _bi_bwd(dout, u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, states,
                   states_b, delta_softplus, divide_out)


@bi_selective_scan_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, states, states_b,
      delta_softplus, divide_out):
    inputs = (u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b)
    fp32_names = {"A", "D", "delta_bias", "A_b", "D_b", "delta_bias_b"}
    return [_empty(u) if x is None else x.new_empty(x.shape, dtype=torch.float32 if k in fp32_names else x.dtype)
            for k, x in zip(_BI_GRAD_ORDER, inputs)]


def _bi_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, divide_out = inputs
    _, states, states_b = output
    # Saved: the inputs and both directions' fp32 chunk-start states; everything inside a chunk is recomputed.
    ctx.save_for_backward(*tensors, states, states_b)
    ctx.present = [t is not None for t in tensors]
    ctx.flags = (delta_softplus, divide_out)


def _bi_grads(ctx, dout, bwd):
    *tensors, states, states_b = ctx.saved_tensors
    grads = bwd(dout, *tensors, states, states_b, *ctx.flags)
    # a missing *_b (shared with its forward twin) has its gradient inside the twin's: None here
    return (*[g if p else None for g, p in zip(grads, ctx.present)], None, None)


bi_selective_scan_fwd_op.register_autograd(
    lambda ctx, dout, dstates, dstates_b: _bi_grads(ctx, dout, bi_selective_scan_bwd_op),
    setup_context=_bi_setup_context)


class _BiScanFunction(torch.autograd.Function):
    """Eager path of the bidirectional op (see _ScanFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, states, states_b = _bi_fwd(*inputs)
        _bi_setup_context(ctx, inputs, (out, states, states_b))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _bi_grads(ctx, dout, _bi_bwd)


def triton_bi_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                             u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                             divide_out=False):
    """The Triton backend of :func:`matten_kernels.bi_selective_scan` (inputs already validated)."""
    args = (u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, bool(delta_softplus),
            bool(divide_out))
    if use_custom_op():
        return bi_selective_scan_fwd_op(*args)[0]
    return _BiScanFunction.apply(*args)
