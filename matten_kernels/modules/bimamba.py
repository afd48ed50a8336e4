"""The bidirectional Mamba mixer (Vision Mamba "bimamba" v1/v2) composed from matten's fused ops.

Parameter names and shapes are those of Vision Mamba's / VideoMamba's ``Mamba(bimamba_type="v2")`` mixer, so their
state dicts load with ``strict=True``. Semantics: SPEC.md sections 2 (bidirectional scan) and 4 (mixer).

Data flow, all in natural order (no flipped copies anywhere on the fast path)::

    xz    = in_proj(hidden)                       (batch, 2*d_inner, L); x, z = its halves (batch, d_inner, L)
    x_f   = silu(causal conv1d(x))                the forward direction
    x_b   = silu(anti-causal conv1d_b(x))         the backward direction (= Vim's flip -> conv1d_b -> flip)
    dt, B, C       = split(x_proj(x_f));   dt_b, B_b, C_b = split(x_proj_b(x_b))
    delta = dt_proj.weight @ dt   (the bias goes in through the scan's delta_bias, softplus inside the scan)
    y     = bi_selective_scan(x_f, delta, A, B, C, D, z, ..., u_b=x_b, delta_b, A_b, B_b, C_b, D_b, ...)
    out   = out_proj(y)                           (batch, L, d_model)

Layout: every (batch, channels, L) tensor is time-contiguous, as the scan and conv kernels read it; the projections
are :func:`channel_linear` (batched GEMMs that take the token-major hidden states and give token-major output), so
no activation or gradient is ever transposed by a copy.

Vim computes the backward direction by flipping xz, running the causal path and flipping the gated output back;
since the gate silu(z) is elementwise, ``out_z_f + flip(out_z_b) = (y_f + y_b) * silu(z)``: the same function.

Variants (``bimamba``):
  * ``"v2"`` (Vim/VideoMamba default, Matten): the backward direction has its own conv1d_b, x_proj_b, dt_proj_b,
    A_b_log and D_b; only in_proj and out_proj are shared.
  * ``"v1"`` (Vim's ``bimamba_inner_fn``): only ``A_b_log`` is separate. The causal conv1d output, x_proj, dt_proj
    (hence delta, B, C and delta_bias) and D are shared: the backward scan runs from the end over the *same* causal
    conv output (there is no anti-causal conv in v1). Vim ignores ``if_devide_out`` for v1; we honour divide_out.
  * ``"none"``: unidirectional Mamba (no ``*_b`` parameters).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn as nn

from .._backend import FLOAT_DTYPES, check_tensor, use_custom_op
from ..conv1d import (bi_depthwise_conv1d_silu, bi_depthwise_conv1d_silu_ref, depthwise_conv1d_silu,
                      depthwise_conv1d_silu_ref)
from ..selective_scan import bi_selective_scan, bi_selective_scan_ref, selective_scan, selective_scan_ref
from ..selective_scan import interface as scan_interface
from .bimamba_core import BiMambaCore, ssm_param
from .channel_linear import channel_linear

logger = logging.getLogger("matten_kernels")

BIMAMBA_TYPES = ("v2", "v1", "none")


def _s4d_real_A_log(d_inner: int, d_state: int, device=None) -> torch.Tensor:
    """S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A) in fp32."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)  # (d_inner, d_state)
    return torch.log(A)


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: input and output ``(batch, L, d_model)``.

    Args:
        d_model: model width D. ``d_inner = expand * d_model``; ``dt_rank = ceil(d_model / 16)`` when "auto".
        d_state, d_conv, expand, dt_rank: SSM state size N, conv width k, expansion E, rank of the dt projection.
        bimamba: "v2" (full backward parameter set), "v1" (only A_b separate) or "none" (unidirectional).
        divide_out: halve the sum of both directions before the gate (Vim's ``if_devide_out``).
        backend: None (auto), "triton", "cuda" or "ref". "cuda" runs the scan through the CUDA C++ extension (the conv
            kernel stays Triton); "ref" runs the slow path. Auto: "ref" for CPU tensors; for CUDA tensors the scan's
            rule (``selective_scan``): the CUDA extension where it was installed ahead of time and serves the shape
            (d_state <= 16, L >= 256, outside deterministic mode), else "triton".
        use_fast_path: False runs the slow path: plain PyTorch (F.conv1d with flips, the reference scan).
        fuse_core: on the fast path, run v2's conv + projections + scan as one autograd node (``BiMambaCore``:
            fewer kernels and less host work in the backward) in eager calls; False composes the public ops, as
            torch.compile and dispatch modes always do. The same function either way.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: the Mamba dt initialisation (see ``reset_parameters``).
        bias: bias of in_proj and out_proj (Vim: False). The conv biases always exist (Vim's conv_bias=True).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 bimamba: str = "v2", divide_out: bool = False, backend: str | None = None,
                 use_fast_path: bool = True, fuse_core: bool = True, dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if bimamba not in BIMAMBA_TYPES:
            raise ValueError(f"BiMamba: bimamba must be one of {BIMAMBA_TYPES}, got {bimamba!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"BiMamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if backend not in (None, "triton", "cuda", "ref"):
            raise ValueError(f"BiMamba: backend must be None, 'triton', 'cuda' or 'ref', got {backend!r}")
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BiMamba: {name} must be a positive int, got {v!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bimamba, self.divide_out = bimamba, divide_out
        self.backend, self.use_fast_path, self.fuse_core = backend, use_fast_path, fuse_core
        self._dt_init = dict(dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                             dt_init_floor=dt_init_floor)
        E, N, R = self.d_inner, d_state, self.dt_rank

        def conv():
            return nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=True, **factory)

        # Same construction order and names as Vim's mixer: in_proj, conv1d, x_proj, dt_proj, A_log, D,
        # [A_b_log, conv1d_b, x_proj_b, dt_proj_b, D_b], out_proj.
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias, **factory)
        self.conv1d = conv()
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False, **factory)
        self.dt_proj = nn.Linear(R, E, bias=True, **factory)
        self.A_log = nn.Parameter(torch.empty(E, N, dtype=torch.float32, device=device))  # fp32 whatever dtype
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32, device=device))
        if bimamba in ("v1", "v2"):
            self.A_b_log = nn.Parameter(torch.empty(E, N, dtype=torch.float32, device=device))
        if bimamba == "v2":
            self.conv1d_b = conv()
            self.x_proj_b = nn.Linear(E, R + 2 * N, bias=False, **factory)
            self.dt_proj_b = nn.Linear(R, E, bias=True, **factory)
            self.D_b = nn.Parameter(torch.empty(E, dtype=torch.float32, device=device))
        self.out_proj = nn.Linear(E, d_model, bias=bias, **factory)
        for name in ("A_log", "D", "A_b_log", "D_b"):
            if hasattr(self, name):
                getattr(self, name)._no_weight_decay = True  # as Mamba: optimiser groups skip these
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba/Vim initialisation of the SSM parameters (the Linear/Conv layers keep PyTorch's default init).

        * A_log, A_b_log: S4D-real, A = -(1 .. d_state) per channel (log stored, fp32).
        * D, D_b: ones.
        * dt_proj(_b).weight: uniform(+-dt_scale * dt_rank^-0.5) ("random") or that constant ("constant").
        * dt_proj(_b).bias: inverse softplus of dt ~ log-uniform in [dt_min, dt_max], clamped below at dt_init_floor,
          so softplus(bias) starts in [dt_min, dt_max]. Vim applies this to dt_proj only and leaves dt_proj_b at the
          nn.Linear default; we initialise both directions alike (SPEC section 4: "the same initialisation").
        """
        c = self._dt_init
        for name in ("A_log", "A_b_log"):
            if hasattr(self, name):
                getattr(self, name).copy_(_s4d_real_A_log(self.d_inner, self.d_state, getattr(self, name).device))
        for name in ("D", "D_b"):
            if hasattr(self, name):
                getattr(self, name).fill_(1.0)
        std = self.dt_rank ** -0.5 * c["dt_scale"]
        for proj in (self.dt_proj, getattr(self, "dt_proj_b", None)):
            if proj is None:
                continue
            if c["dt_init"] == "constant":
                nn.init.constant_(proj.weight, std)
            else:
                nn.init.uniform_(proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner, device=proj.bias.device)
                           * (math.log(c["dt_max"]) - math.log(c["dt_min"])) + math.log(c["dt_min"]))
            dt = dt.clamp(min=c["dt_init_floor"])
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            proj.bias._no_reinit = True  # as Mamba: a model-wide init must not zero this bias

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, bimamba={self.bimamba!r}, divide_out={self.divide_out}, "
                f"backend={self.backend!r}, use_fast_path={self.use_fast_path}")

    # ----------------------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (batch, L, d_model) -> (batch, L, d_model), same dtype."""
        op = "BiMamba"
        check_tensor("hidden_states", hidden_states, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,), op=op)
        batch, L, d = hidden_states.shape
        if d != self.d_model:
            raise ValueError(f"{op}: hidden_states must have shape (batch, L, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        if batch == 0 or L == 0:
            raise ValueError(f"{op}: hidden_states has an empty batch or sequence (shape {tuple(hidden_states.shape)})")
        if hidden_states.device != self.in_proj.weight.device:
            raise ValueError(f"{op}: hidden_states is on {hidden_states.device}, the module on "
                             f"{self.in_proj.weight.device}")
        # the scan's rule (None: the prebuilt CUDA extension where it serves the shape faster, else Triton)
        backend = scan_interface.scan_backend(self.backend, hidden_states.device, self.d_state, L, op)
        if backend == "cuda" and hidden_states.device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got hidden_states on {hidden_states.device}")
        if self.use_fast_path and backend in ("triton", "cuda"):
            return self._forward(hidden_states, fast=True, scan_backend=backend)
        return self._forward(hidden_states, fast=False)

    def _fused_core(self, xz: torch.Tensor) -> bool:
        """Whether the eager fast path runs conv + projections + scan as one autograd node (``BiMambaCore``): v2 with
        ``fuse_core``, outside torch.compile and dispatch modes (they see the composition of custom ops), and rows the kernels
        take unpadded (an unaligned L goes through ``bi_selective_scan``, which pads it; logged once)."""
        if not self.fuse_core or self.bimamba != "v2" or use_custom_op() or xz.dtype not in FLOAT_DTYPES:
            return False
        L = xz.shape[-1]
        if L % scan_interface.BI_ALIGN and xz.device.type in scan_interface.BI_PAD_DEVICES:
            _log_unaligned(L)
            return False
        return True

    def _forward(self, hidden_states: torch.Tensor, fast: bool, scan_backend: str = "triton") -> torch.Tensor:
        """One composition for both paths; ``fast`` picks the fused ops (Triton conv, ``scan_backend`` scan) or the
        plain PyTorch references."""
        batch, L, _ = hidden_states.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        xz = channel_linear(hidden_states, self.in_proj.weight, self.in_proj.bias, transpose_in=True)  # (batch, 2E, L)
        if fast and self._fused_core(xz):
            y = BiMambaCore.apply(
                xz, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias,
                self.x_proj.weight, self.x_proj_b.weight, self.dt_proj.weight, self.dt_proj_b.weight,
                self.A_log, self.A_b_log, self.D, self.D_b, self.dt_proj.bias, self.dt_proj_b.bias, R,
                self.divide_out, scan_backend, torch.is_grad_enabled())
            return channel_linear(y, self.out_proj.weight, self.out_proj.bias, transpose_out=True)
        x, z = torch.split(xz, [E, E], dim=1)  # (batch, E, L) views, time-contiguous; backward: one cat of dx, dz

        conv_w = self.conv1d.weight[:, 0, :]  # (E, k) view of (E, 1, k)
        if self.bimamba == "v2":
            conv_w_b = self.conv1d_b.weight[:, 0, :]
            if fast:
                x_f, x_b = bi_depthwise_conv1d_silu(x, conv_w, self.conv1d.bias, conv_w_b, self.conv1d_b.bias,
                                                    backend="triton")
            else:
                x_f, x_b = bi_depthwise_conv1d_silu_ref(x, conv_w, self.conv1d.bias, conv_w_b, self.conv1d_b.bias)
        else:
            if fast:
                x_f = depthwise_conv1d_silu(x, conv_w, self.conv1d.bias, backend="triton")
            else:
                x_f = depthwise_conv1d_silu_ref(x, conv_w, self.conv1d.bias)
            x_b = None

        def project(u, x_proj, dt_proj):
            """u (batch, E, L) -> delta (batch, E, L), B, C (batch, N, L), all time-contiguous."""
            x_dbl = channel_linear(u, x_proj.weight)  # (batch, R + 2N, L)
            dt, B, C = torch.split(x_dbl, [R, N, N], dim=1)
            return channel_linear(dt, dt_proj.weight), B, C  # delta without its bias: that goes to delta_bias

        delta, B, C = project(x_f, self.x_proj, self.dt_proj)
        A = -torch.exp(ssm_param(self.A_log))  # (E, N)
        D, dt_bias = ssm_param(self.D), ssm_param(self.dt_proj.bias)
        if self.bimamba == "none":
            if fast:
                y = selective_scan(x_f, delta, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True,
                                   backend=scan_backend)
            else:
                y = selective_scan_ref(x_f, delta, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True)
        else:
            kw = dict(A_b=-torch.exp(ssm_param(self.A_b_log)), divide_out=self.divide_out)
            if self.bimamba == "v2":
                delta_b, B_b, C_b = project(x_b, self.x_proj_b, self.dt_proj_b)
                kw.update(u_b=x_b, delta_b=delta_b, B_b=B_b, C_b=C_b, D_b=ssm_param(self.D_b),
                          delta_bias_b=ssm_param(self.dt_proj_b.bias))
            if fast:
                y = bi_selective_scan(x_f, delta, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True,
                                      backend=scan_backend, **kw)
            else:
                y = bi_selective_scan_ref(x_f, delta, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True, **kw)
        return channel_linear(y, self.out_proj.weight, self.out_proj.bias, transpose_out=True)  # (batch, L, d_model)


@functools.lru_cache(maxsize=None)
def _log_unaligned(L: int) -> None:
    logger.info("BiMamba: L = %d is not a multiple of %d: the mixer runs as a composition of ops (the scan pads the "
                "rows), not as one fused node", L, scan_interface.BI_ALIGN)
