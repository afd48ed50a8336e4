"""The ops users would otherwise use, for the benchmarks to beat (issue 7).

* Bidirectional Mamba mixer as Vision Mamba composes it (bimamba v2): the causal path once on the sequence and once
  on its flipped copy (``torch.flip`` of the conv input, of z, and of the output), ``F.conv1d`` with padding and
  slicing for the short convolution, ``x_proj`` / ``dt_proj`` as plain matmuls, and a unidirectional selective scan:
  ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` when mamba_ssm is importable, else mamba-ssm's
  compiled ``selective_scan_cuda`` extension when that is importable (``MATTEN_MAMBA_BUILD``), else matten's own
  ``selective_scan`` (Triton) called twice. ``SCAN_PROVIDER`` says which one ran; every result file records it.
* Video attention as users write it with PyTorch: einops ``rearrange`` of q, k, v into (sequences, heads, L, d),
  ``F.scaled_dot_product_attention`` (FlashAttention / cuDNN / efficient backends, whichever PyTorch picks), and the
  rearrange back.
* adaLN: DiT's ``modulate(norm(x), shift, scale)`` and ``x + gate * branch`` as separate PyTorch ops.

``swap_in_baselines(model)`` returns a context manager that runs a Matten model on these ops with its own weights,
so "our kernels vs. the ops users would otherwise use" compares the same parameters and the same math.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

class _MambaCudaScan(torch.autograd.Function):
    """mamba-ssm's compiled CUDA scan (``selective_scan_cuda.fwd/bwd``, the kernels behind ``selective_scan_fn``)
    called directly, for when only the extension is importable (built from the mamba-ssm source distribution with
    benchmarks/build_mamba_scan.py; nothing of it is in this repository). Same argument handling as selective_scan_fn:
    last dims made contiguous, (batch, N, L) B/C passed as one group, the gate z fused."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        mod = sys.modules["selective_scan_cuda"]
        last = lambda x: x if x is None or x.stride(-1) == 1 else x.contiguous()  # noqa: E731
        u, delta, z = last(u), last(delta), last(z)
        B, C = last(B).unsqueeze(1), last(C).unsqueeze(1)  # (batch, 1, N, L)
        out, x, *rest = mod.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        ctx.delta_softplus = delta_softplus
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        mod = sys.modules["selective_scan_cuda"]
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = mod.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, x, out if z is not None else None, None, ctx.delta_softplus,
            False)
        return (du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD, rest[0] if z is not None else None, ddelta_bias,
                None)


def _scan_provider():
    """(callable like selective_scan_fn, name): mamba_ssm if importable, else its compiled extension if importable
    (put its folder on sys.path or in MATTEN_MAMBA_BUILD), else matten's own unidirectional Triton scan."""
    try:  # optional peer: mamba-ssm's CUDA selective scan (never vendored)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn, "mamba_ssm.selective_scan_fn"
    except ImportError:
        pass
    build = os.environ.get("MATTEN_MAMBA_BUILD")
    if build and build not in sys.path:
        sys.path.insert(0, build)
    try:
        importlib.import_module("selective_scan_cuda")
        return _MambaCudaScan.apply, "mamba-ssm selective_scan_cuda (its CUDA kernels, built from the 2.3.2.post1 source)"
    except ImportError:
        return None, "matten_kernels.selective_scan (mamba_ssm not importable)"


_mamba_selective_scan_fn, SCAN_PROVIDER = _scan_provider()


def uni_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """One direction of the scan through the provider in ``SCAN_PROVIDER`` (same signature as selective_scan_fn)."""
    if _mamba_selective_scan_fn is not None:
        return _mamba_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from matten_kernels import selective_scan

    return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          backend="triton" if u.is_cuda else None)


def vim_bi_selective_scan(u, delta, A, B, C, D, z, delta_bias, *, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b):
    """Vim's bidirectional scan: ``out_f + flip(scan(flip(inputs_b)))``, each direction gated by silu(z) inside.

    Same function as ``matten_kernels.bi_selective_scan(..., delta_softplus=True)`` with all ``*_b`` given (SPEC.md
    section 2), computed with flipped copies and two launches, as Vision Mamba / VideoMamba do.
    """
    out_f = uni_selective_scan(u, delta, A, B, C, D, z, delta_bias, True)
    flip = lambda x: x.flip(-1)  # noqa: E731
    out_b = uni_selective_scan(flip(u_b), flip(delta_b), A_b, flip(B_b), flip(C_b), D_b, None if z is None else flip(z),
                               delta_bias_b, True)
    return out_f + flip(out_b)


class VimBiMamba(nn.Module):
    """Vision Mamba's bimamba-v2 forward over the parameters of a :class:`matten_kernels.modules.BiMamba`.

    The wrapped module's parameters are used as they are (no copy), so outputs match the wrapped module's up to
    rounding; only the composition differs: flipped copies, ``F.conv1d`` with padding k-1 then a slice, separate
    scans per direction.
    """

    def __init__(self, mixer: nn.Module):
        super().__init__()
        if getattr(mixer, "bimamba", None) != "v2":
            raise ValueError(f"VimBiMamba: wraps a BiMamba with bimamba='v2', got {getattr(mixer, 'bimamba', None)!r}")
        self.mixer = mixer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        m = self.mixer
        batch, L, _ = hidden_states.shape
        E, N, R, k = m.d_inner, m.d_state, m.dt_rank, m.d_conv
        # as Vim's mamba_simple: in_proj.weight @ hidden^T, so xz is born time-contiguous (strides (L, batch*L, 1))
        xz = rearrange(m.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l", l=L)
        if m.in_proj.bias is not None:
            xz = xz + m.in_proj.bias.to(xz.dtype)[:, None]
        x, z = xz.chunk(2, dim=1)

        def direction(x, z, conv, x_proj, dt_proj, A_log, D):
            x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=k - 1, groups=E)[..., :L])  # (batch, E, L)
            x_dbl = F.linear(rearrange(x, "b d l -> (b l) d"), x_proj.weight)  # (batch*L, R + 2N)
            dt, B, C = torch.split(x_dbl, [R, N, N], dim=-1)
            delta = rearrange(dt_proj.weight @ dt.t(), "d (b l) -> b d l", l=L)  # (batch, E, L)
            B = rearrange(B, "(b l) n -> b n l", l=L).contiguous()
            C = rearrange(C, "(b l) n -> b n l", l=L).contiguous()
            A = -torch.exp(A_log.float())
            return uni_selective_scan(x, delta, A, B, C, D.float(), z, dt_proj.bias.float(), True)

        out = direction(x, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
        out_b = direction(x.flip(-1), z.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b)
        y = out + out_b.flip(-1)
        if m.divide_out:
            y = y / 2
        return m.out_proj(rearrange(y, "b d l -> b l d"))  # (batch, L, d_model)


_SDPA_PATTERNS = {
    "spatial": "b (f s) h d -> (b f) h s d",
    "temporal": "b (f s) h d -> (b s) h f d",
    "global": "b (f s) h d -> b h (f s) d",
}


def sdpa_video_attention(q, k, v, *, num_frames, axis, softmax_scale=None, backend=None):
    """Video attention with einops rearranges and ``F.scaled_dot_product_attention`` (signature of
    ``matten_kernels.video_attention``; ``backend`` is accepted and ignored)."""
    batch, tokens, heads, head_dim = q.shape
    Fr, S = num_frames, tokens // num_frames
    pattern = _SDPA_PATTERNS[axis]
    qs, ks, vs = (rearrange(x, pattern, f=Fr, s=S) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)
    inverse = " -> ".join(reversed(pattern.split(" -> ")))
    return rearrange(o, inverse, b=batch, f=Fr, s=S)


def sdpa_video_attention_qkvpacked(qkv, *, num_frames, axis, softmax_scale=None, backend=None):
    """:func:`sdpa_video_attention` on the slots of a packed (batch, F*S, 3, heads, head_dim) qkv (signature of
    ``matten_kernels.video_attention_qkvpacked``)."""
    q, k, v = qkv.unbind(2)
    return sdpa_video_attention(q, k, v, num_frames=num_frames, axis=axis, softmax_scale=softmax_scale)


def torch_layer_norm_modulate(x, shift, scale, *, eps, out_dtype, backend=None):
    """DiT's ``modulate(norm(x), shift, scale)`` in PyTorch ops (signature of ``matten_kernels.layer_norm_modulate``;
    the cast to out_dtype is the one autocast would make before the next GEMM)."""
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).to(out_dtype)


def torch_gated_residual(x, gate, y, *, backend=None):
    """DiT's ``x + gate.unsqueeze(1) * y`` (signature of ``matten_kernels.gated_residual``)."""
    return x + gate.unsqueeze(1) * y


# the names matten.model calls, and what the baseline model calls instead
_MODEL_OPS = {"video_attention_qkvpacked": sdpa_video_attention_qkvpacked,
              "layer_norm_modulate": torch_layer_norm_modulate, "gated_residual": torch_gated_residual}


@contextlib.contextmanager
def swap_in_baselines(model: nn.Module):
    """Run ``model`` on the baseline ops inside the ``with`` block: every BiMamba mixer is replaced by a
    :class:`VimBiMamba` over its own parameters, the model's attention calls ``sdpa_video_attention_qkvpacked`` and
    its adaLN LayerNorm/modulate and gated residuals are the PyTorch compositions DiT writes. Everything is restored
    on exit."""
    from matten_kernels.modules import BiMamba

    import matten.model as model_module

    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BiMamba):
                setattr(parent, name, VimBiMamba(child))
                replaced.append((parent, name, child))
    saved = {name: getattr(model_module, name) for name in _MODEL_OPS}
    for name, fn in _MODEL_OPS.items():
        setattr(model_module, name, fn)
    try:
        yield model
    finally:
        for name, fn in saved.items():
            setattr(model_module, name, fn)
        for parent, name, child in replaced:
            setattr(parent, name, child)
