"""The v2 mixer's middle as one autograd node: both convolutions, both projections and the bidirectional scan.

``BiMamba`` composed from the public ops gives autograd a dozen nodes a call between in_proj and out_proj (the conv,
two x_proj and two dt_proj products with their splits, the scan), and their backward pays for the composition:

* ``x_f`` feeds both x_proj and the scan, so autograd adds the two gradients of it (one elementwise kernel over
  (batch, d_inner, L) per direction); here the x_proj input gradient is added by the GEMM's epilogue, in place
  into the scan's du (``baddbmm_``; the out-of-place form copies du first);
* the split of ``xz`` into x and z is undone by a cat of dx and dz; here the conv backward writes dx straight into
  its half of d(xz) and the scan its dz into the other (the CUDA scan directly, the Triton one through a copy);
* on the CUDA scan, z (a slice of xz) and B, C (slices of the x_proj output) are read in place, not copied.
* each node is a round of Python and dispatcher work on the host.

Measured on an H100 (``benchmarks/README.md`` "Session 11"): the same device time as the composition, less host time
(3.35 vs 4.20 ms a fwd+bwd at 1024 tokens on the CUDA scan). With the copies above removed (session 15) the global XL
mixer's fwd+bwd on the CUDA scan is 3.60 ms eager against 3.78 before, 2.05x Vim's composition over mamba-ssm
(``benchmarks/README.md`` "Session 15").

Same maths, same kernels, same saved tensors as the composition (``BiMamba._forward`` with ``fast=True``); the tests
check one against the other. It serves eager calls of the v2 mixer on the kernel backends; torch.compile and dispatch
modes (FlopCounterMode) keep the composition of custom ops, which they can see into.

    x, z = xz halves                                   (batch, E, L) views
    x_f, x_b = silu(conv(x)), silu(anti-causal conv_b(x))
    xdbl = x_proj_w @ x_f = [dt; B; C],  delta = dt_proj_w @ dt;  the same for the backward direction
    y = bi_selective_scan(x_f, delta, A, B, C, D, z, dt_bias, softplus, u_b=x_b, delta_b, A_b, B_b, C_b, D_b, ...)
"""

from __future__ import annotations

import torch

from ..conv1d.triton_bwd import dwconv_silu_bwd_launch
from ..conv1d.triton_fwd import dwconv_silu_fwd_launch
from . import ssm_params
from .channel_linear import sum_of_products

_SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
              "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b")


def _scan_fwd(backend: str, args: dict, divide_out: bool, save: bool):
    """(y, saved tensors, config) on the chosen backend, without validation or autograd (inputs built by the mixer);
    ``save`` False (no backward will run) lets the CUDA forward skip its saved states."""
    if backend == "cuda":
        from ..selective_scan import cuda

        # z = xz[:, E:] and B, C (slices of the x_proj output) as they are: the extension takes any batch stride
        y, (states, y_saved, cfg) = cuda.bi_scan_fwd_raw(
            *(args[k] for k in _SCAN_ARGS), True, divide_out, save)
        return y, (states, y_saved), cfg
    from ..selective_scan._ops import _bi_fwd

    y, states, states_b = _bi_fwd(*(args[k] for k in _SCAN_ARGS), True, divide_out)
    return y, (states, states_b), None


def _scan_bwd(backend: str, dy, args: dict, saved, cfg, divide_out: bool, dz_out: torch.Tensor) -> dict:
    """The scan's gradients; dz goes into ``dz_out`` (the z half of d(xz))."""
    if backend == "cuda":
        from ..selective_scan import cuda

        return cuda.bi_scan_bwd_raw(dy, *(args[k] for k in _SCAN_ARGS), (*saved, cfg), True, divide_out,
                                    dz_out=dz_out)
    from ..selective_scan._ops import _BI_GRAD_ORDER, _bi_bwd

    g = dict(zip(_BI_GRAD_ORDER, _bi_bwd(dy, *(args[k] for k in _SCAN_ARGS), *saved, True, divide_out)))
    dz_out.copy_(g.pop("z"))
    return g


def ssm_param(p: torch.Tensor) -> torch.Tensor:
    """An SSM parameter (A_log, D, dt bias) as the scan takes it: fp32 (kept fp64 for fp64 modules, which tests use on
    the slow path)."""
    return p if p.dtype == torch.float64 else p.float()


class BiMambaCore(torch.autograd.Function):
    """xz (batch, 2E, L) and the v2 mixer's parameters as the module holds them -> y (batch, E, L), the gated scan
    output before out_proj.

    The parameters' preparation happens inside the node, not as autograd nodes of its own (each one a round of host
    work and a small kernel in both passes): conv weights (E, 1, k) viewed as (E, k), projection weights cast to the
    compute dtype (xz's, as ``channel_linear`` casts), A = -exp(A_log), D and the dt biases in fp32 (one launch,
    ``ssm_params``); the backward returns every gradient in its parameter's dtype (dA_log = dA * A: one launch for
    the six SSM parameters, one sum and one cast for the four conv ones). Those launches took the eager global XL
    fwd+bwd on the CUDA scan from 4.36 / 3.95 to 2.95 / 3.38 ms in two rounds of one call (Vim's 7.37 / 7.35; the
    same kernels in a CUDA graph 2.87 -> 2.82: H100, ``benchmarks/README.md`` "Session 22")."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_b, conv_weight_b, conv_b_b, xproj_weight, xproj_weight_b, dtproj_weight,
                dtproj_weight_b, A_log, A_b_log, D_param, D_b_param, dt_bias_param, dt_bias_b_param, dt_rank: int,
                divide_out: bool, backend: str, save: bool):
        ctx.dtypes = [t.dtype for t in (xproj_weight, xproj_weight_b, dtproj_weight, dtproj_weight_b, A_log, A_b_log,
                                        D_param, D_b_param, dt_bias_param, dt_bias_b_param)]
        conv_w, conv_w_b = conv_weight[:, 0, :], conv_weight_b[:, 0, :]
        xproj_w, xproj_w_b, dtproj_w, dtproj_w_b = (w.to(xz.dtype) for w in (xproj_weight, xproj_weight_b,
                                                                            dtproj_weight, dtproj_weight_b))
        A, A_b, D, D_b, dt_bias, dt_bias_b = ssm_params.prepare(A_log, A_b_log, D_param, D_b_param, dt_bias_param,
                                                                dt_bias_b_param)
        n, E2, L = xz.shape
        E, N, R = E2 // 2, A.shape[1], dt_rank
        x, z = xz[:, :E], xz[:, E:]
        x_f, x_b = dwconv_silu_fwd_launch(x, conv_w, conv_b, conv_w_b, conv_b_b)
        xdbl = torch.bmm(xproj_w.expand(n, -1, -1), x_f)  # (n, R + 2N, L)
        xdbl_b = torch.bmm(xproj_w_b.expand(n, -1, -1), x_b)
        dt, B, C = torch.split(xdbl, [R, N, N], dim=1)
        dt_b, B_b, C_b = torch.split(xdbl_b, [R, N, N], dim=1)
        delta = torch.bmm(dtproj_w.expand(n, -1, -1), dt)  # (n, E, L); its bias goes in as the scan's delta_bias
        delta_b = torch.bmm(dtproj_w_b.expand(n, -1, -1), dt_b)
        args = dict(u=x_f, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=dt_bias, u_b=x_b, delta_b=delta_b,
                    A_b=A_b, B_b=B_b, C_b=C_b, D_b=D_b, delta_bias_b=dt_bias_b)
        y, saved, cfg = _scan_fwd(backend, args, divide_out, save)
        ctx.save_for_backward(xz, conv_w, conv_b, conv_w_b, conv_b_b, xproj_w, xproj_w_b, dtproj_w, dtproj_w_b,
                              A, A_b, D, D_b, dt_bias, dt_bias_b, x_f, x_b, xdbl, xdbl_b, delta, delta_b, *saved)
        ctx.meta = (R, N, divide_out, backend, cfg)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (xz, conv_w, conv_b, conv_w_b, conv_b_b, xproj_w, xproj_w_b, dtproj_w, dtproj_w_b, A, A_b, D, D_b, dt_bias,
         dt_bias_b, x_f, x_b, xdbl, xdbl_b, delta, delta_b, *saved) = ctx.saved_tensors
        R, N, divide_out, backend, cfg = ctx.meta
        n, E2, L = xz.shape
        E = E2 // 2
        dt, B, C = torch.split(xdbl, [R, N, N], dim=1)
        dt_b, B_b, C_b = torch.split(xdbl_b, [R, N, N], dim=1)
        args = dict(u=x_f, delta=delta, A=A, B=B, C=C, D=D, z=xz[:, E:], delta_bias=dt_bias, u_b=x_b,
                    delta_b=delta_b, A_b=A_b, B_b=B_b, C_b=C_b, D_b=D_b, delta_bias_b=dt_bias_b)
        dxz = torch.empty_like(xz, memory_format=torch.contiguous_format)
        g = _scan_bwd(backend, dy, args, saved, cfg, divide_out, dz_out=dxz[:, E:])
        del args, saved

        def project_bwd(sfx, u, dt, xproj_w, dtproj_w):
            """Through delta = dtproj_w @ dt and xdbl = xproj_w @ u: (du + the x_proj input gradient, dxproj_w,
            ddtproj_w); the scan's du is the C of the x_proj input-gradient GEMM. Each scan gradient is popped from
            ``g`` where it is consumed, so it is freed there (as autograd would)."""
            ddelta = g.pop("delta" + sfx)
            ddt = torch.bmm(dtproj_w.t().expand(n, -1, -1), ddelta)  # (n, R, L)
            ddtproj_w = sum_of_products(ddelta, dt)
            del ddelta
            dxdbl = torch.cat([ddt, g.pop("B" + sfx).to(ddt.dtype), g.pop("C" + sfx).to(ddt.dtype)], dim=1)
            del ddt
            du = g.pop("u" + sfx).baddbmm_(xproj_w.t().expand(n, -1, -1), dxdbl)  # in place: the scan's du is ours
            return du, sum_of_products(dxdbl, u), ddtproj_w

        du_f, dxproj_w, ddtproj_w = project_bwd("", x_f, dt, xproj_w, dtproj_w)
        du_b, dxproj_w_b, ddtproj_w_b = project_bwd("_b", x_b, dt_b, xproj_w_b, dtproj_w_b)
        _, dconv_w, dconv_b, dconv_w_b, dconv_b_b = dwconv_silu_bwd_launch(
            du_f, du_b, xz[:, :E], conv_w, conv_b, conv_w_b, conv_b_b, dx_out=dxz[:, :E], grads_as_views=True)
        proj_grads = (t.to(dt) for t, dt in zip((dxproj_w, dxproj_w_b, ddtproj_w, ddtproj_w_b), ctx.dtypes))
        ssm_grads = ssm_params.grads(g["A"], g["A_b"], A, A_b, g["D"], g["D_b"], g["delta_bias"], g["delta_bias_b"],
                                     ctx.dtypes[4:])
        return (dxz, dconv_w[:, None], dconv_b, dconv_w_b[:, None], dconv_b_b, *proj_grads, *ssm_grads,
                None, None, None, None)
