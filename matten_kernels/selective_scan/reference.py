"""Plain PyTorch selective scan (Mamba S6), uni- and bidirectional: the spec every backend is checked against.

A loop over time, fp32 state (or the input precision when that is float64, as tests use). Never optimise this file.
Semantics: SPEC.md section 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _channel_steps(X: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C, (batch, N, L) or (batch, G, N, L) -> time-major (L, batch, 1 or dim, N), whose step t broadcasts to
    (batch, dim, N): group g serves channels g*dim/G ... (g+1)*dim/G - 1."""
    X = X.movedim(-1, 0)  # (L, batch, N) or (L, batch, G, N)
    if X.dim() == 3:
        return X.unsqueeze(2).contiguous()
    return X.repeat_interleave(dim // X.shape[2], dim=2).contiguous()


def _scan(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state, reverse):
    """y (batch, dim, L) and the last state (batch, dim, N), all in the compute dtype (fp32, or fp64 for fp64 input)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    u, delta = u.to(dtype), delta.to(dtype)
    A = A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20.0, delta, F.softplus(delta))  # softplus(x) = x for x > 20, as the kernels
    # The loop reads one time step of every input: it reads them from time-major copies, so each step's rows are
    # contiguous whatever the caller's layout (a layout choice; the arithmetic and its order are as written below).
    u_steps, delta_steps = (x.movedim(-1, 0).contiguous() for x in (u, delta))  # (L, batch, dim)
    B_steps, C_steps = (_channel_steps(X.to(dtype), dim) for X in (B, C))  # (L, batch, 1 or dim, N)
    h = initial_state.to(dtype) if initial_state is not None else u.new_zeros(batch, dim, A.shape[1])
    ys = [None] * L
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        d_t = delta_steps[t, :, :, None]  # (batch, dim, 1)
        h = torch.exp(d_t * A) * h + d_t * B_steps[t] * u_steps[t, :, :, None]
        ys[t] = (h * C_steps[t]).sum(-1)
    y = torch.stack(ys, dim=-1)  # (batch, dim, L)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y, h


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None):
    """Reference of :func:`matten_kernels.selective_scan` (same signature minus ``backend``).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,);
    initial_state: (batch, dim, N). Returns out (batch, dim, L) in u.dtype, and with ``return_last_state`` also
    last_state (batch, dim, N) in fp32 (fp64 for fp64 input).
    """
    y, last_state = _scan(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state, reverse=False)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    out = y.to(u.dtype)
    return (out, last_state) if return_last_state else out


def bi_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                          u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                          divide_out=False):
    """Reference of :func:`matten_kernels.bi_selective_scan`.

    The forward direction scans t = 0 .. L-1 over (u, delta, A, B, C, D, delta_bias); the backward direction scans
    t = L-1 .. 0 over the ``*_b`` inputs, given in natural order (a missing one is its forward twin).
    out = (y_f + y_b) [/ 2 if divide_out] [* silu(z)], in u.dtype.
    """
    twin = lambda b, f: f if b is None else b  # noqa: E731
    y_f, _ = _scan(u, delta, A, B, C, D, delta_bias, delta_softplus, None, reverse=False)
    y_b, _ = _scan(twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C), twin(D_b, D),
                   twin(delta_bias_b, delta_bias), delta_softplus, None, reverse=True)
    y = y_f + y_b
    if divide_out:
        y = y / 2
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)
