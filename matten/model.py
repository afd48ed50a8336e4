"""Matten: a latent video diffusion backbone mixing spatial/temporal attention with a global bidirectional Mamba.

Reads top to bottom (as DiT's ``models.py``): helpers, embedders, blocks, condition-token layouts, final layer, the
model, position embeddings, presets. Architecture and presets: SPEC.md section 4; the variants' block layouts:
``matten/config.py``; the reasoning behind the choices: docs/model.md.

Token layout everywhere: a clip of F frames with S = (H/p)(W/p) patches per frame is ``(B, F*S, D)`` frame-major
(token ``f*S + s``, s row-major), the layout ``video_attention`` takes. Attention blocks never rearrange: they hand
the packed qkv projection to ``video_attention_qkvpacked`` with ``axis="spatial"`` or ``"temporal"``.
Mamba blocks scan the F*S tokens in that order ("spatial-first", global), or rearrange to one sequence per frame
(spatial) or per position (temporal) in the batch dim.

M-AdaN (the Mamba blocks' modulation). The paper writes ``alpha_c * f + MambaScans(gamma_c * Norm(f) + beta_c)``
and says the layer is zero-initialised as in DiT. Read literally, a zero alpha would cut the residual stream, so we
follow the adaLN-Zero convention it cites: ``f + alpha_c * BiMamba(Norm(f) * (1 + gamma_c) + beta_c)`` with
``(gamma_c, beta_c, alpha_c) = Linear(SiLU(c))`` zero-initialised, so every block starts as the identity.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import fields

import torch
import torch.nn as nn
import torch.utils.checkpoint
from einops import rearrange, repeat

from matten_kernels import video_attention, video_attention_qkvpacked
from matten_kernels._backend import autocast_dtype
from matten_kernels.adaln import gated_residual, layer_norm_modulate
from matten_kernels.modules import BiMamba

from ._compat import ConfigMixin, ModelMixin, Transformer2DModelOutput, register_to_config
from .config import MattenConfig, get_config

# kernel_backend -> the backend= argument of video_attention, the adaLN ops and BiMamba. "auto" is None (triton for
# CUDA tensors, ref on the CPU; BiMamba's scan takes a CUDA extension installed ahead of time where it serves the
# shape: selective_scan's rule). "cuda" selects the CUDA C++ scan; attention and the adaLN ops have no CUDA C++
# kernel, so they run on triton then.
_TRITON_BACKEND = {"auto": None, "triton": "triton", "cuda": "triton", "ref": "ref"}
_MAMBA_BACKEND = {"auto": None, "triton": "triton", "cuda": "cuda", "ref": "ref"}


# ======================================================================================================================
# helpers
# ======================================================================================================================
def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  backend: str | None) -> torch.Tensor:
    """DiT's ``modulate(norm(x), shift, scale)`` = LN(x) * (1 + scale) + shift, shift/scale (B, D) broadcast over the
    tokens of x (B, N, D). One fused pass (``matten_kernels.adaln``), written in the dtype the next GEMM computes in
    (the autocast dtype under autocast)."""
    return layer_norm_modulate(x, shift, scale, eps=norm.eps, out_dtype=autocast_dtype(x), backend=backend)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no affine: adaLN supplies scale and shift


# ======================================================================================================================
# embedders
# ======================================================================================================================
class PatchEmbed(nn.Module):
    """Per-frame p x p patches: (B, C, F, H, W) -> (B, F*S, D) frame-major tokens."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = x.shape[2]
        x = rearrange(x, "b c f h w -> (b f) c h w")  # (B*F, C, H, W)
        x = self.proj(x)  # (B*F, D, H/p, W/p)
        return rearrange(x, "(b f) d h w -> b (f h w) d", f=num_frames)  # (B, F*S, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, D): sinusoid of width 256, then Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t (B,) (may be fractional) -> (B, dim) = [cos(t * w_i), sin(t * w_i)], w_i = max_period^(-i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim) (dim is even here: 256)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D). Row ``num_classes`` is the null class: labels are dropped to it with probability
    ``dropout_prob`` in training, and classifier-free guidance feeds it for the unconditional half (DiT)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (B,) no host sync
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (B, D)


# ======================================================================================================================
# blocks
# ======================================================================================================================
class Attention(nn.Module):
    """Multi-head softmax attention within frames (``axis="spatial"``) or across frames (``"temporal"``).

    ``qk_norm``: q and k are RMS-normalised per head with a learned scale (as in SD3 and ViT-22B) before the dot
    products, which bounds the logits; not part of the paper's model (MattenConfig.qk_norm, default off)."""

    def __init__(self, dim: int, num_heads: int, axis: str, backend: str | None, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.axis, self.backend = num_heads, dim // num_heads, axis, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, F*S, 3, heads, head_dim), no copy
        if self.q_norm is None:
            # read in place by the kernels; the backward writes the packed gradient of qkv directly
            o = video_attention_qkvpacked(qkv, num_frames=num_frames, axis=self.axis, backend=self.backend)
        else:
            q, k, v = qkv.unbind(dim=2)  # strided views; the norms make new q and k (v stays a view)
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # (autocast may run the norm in fp32)
            o = video_attention(q, k, v, num_frames=num_frames, axis=self.axis, backend=self.backend)
        return self.proj(o.reshape(B, N, D))  # (B, F*S, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionBlock(nn.Module):
    """DiT/Latte block: x += g1 * Attn(mod(LN(x))); x += g2 * MLP(mod(LN(x))); adaLN with 6 chunks.

    With ``condition="tokens"`` there is no modulation (``c`` is None): x += Attn(LN(x)); x += MLP(LN(x)).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, axis: str, adaln: bool, backend: str | None,
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, axis, backend, qk_norm)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True)) if adaln else None
        self.backend = backend  # of the adaLN ops too

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        if self.adaLN_modulation is None:
            x = x + self.attn(self.norm1(x), num_frames)
            return x + self.mlp(self.norm2(x))
        # six (B, D) chunks: shift, scale and gate of the attention branch, then of the MLP branch
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + gate * branch(LN(x) * (1 + scale) + shift), each in two fused passes (matten_kernels.adaln)
        h = norm_modulate(self.norm1, x, shift_msa, scale_msa, self.backend)
        x = gated_residual(x, gate_msa, self.attn(h, num_frames), backend=self.backend)
        h = norm_modulate(self.norm2, x, shift_mlp, scale_mlp, self.backend)
        return gated_residual(x, gate_mlp, self.mlp(h), backend=self.backend)


class MambaBlock(nn.Module):
    """Bidirectional Mamba block with M-AdaN: x += alpha * BiMamba(LN(x) * (1 + gamma) + beta).

    ``axis="global"`` scans all F*S tokens of a clip in frame-major (spatial-first) order; ``"spatial"`` scans the S
    tokens of each frame and ``"temporal"`` the F tokens of each position, as independent sequences in the batch dim.
    With ``condition="tokens"`` there is no modulation: x += BiMamba(LN(x)).
    """

    def __init__(self, dim: int, axis: str, config: MattenConfig, adaln: bool, backend: str | None,
                 adaln_backend: str | None):
        super().__init__()
        self.axis = axis
        self.norm = _layer_norm(dim)
        self.mixer = BiMamba(dim, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                             dt_rank=config.dt_rank, bimamba="v2", backend=backend)
        self.adaln_backend = adaln_backend
        # M-AdaN: (gamma, beta, alpha) = Linear(SiLU(c)), zero-initialised (module docstring: the adaLN-Zero reading)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim, bias=True)) if adaln else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        if self.adaLN_modulation is None:
            return x + self._scan(self.norm(x), num_frames)  # (B, F*S, D)
        gamma, beta, alpha = self.adaLN_modulation(c).chunk(3, dim=1)  # each (B, D)
        h = norm_modulate(self.norm, x, beta, gamma, self.adaln_backend)  # LN(x) * (1 + gamma) + beta
        return gated_residual(x, alpha, self._scan(h, num_frames), backend=self.adaln_backend)

    def _scan(self, h: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.axis == "global":
            return self.mixer(h)  # (B, F*S, D): one sequence per clip, spatial-first
        if self.axis == "spatial":
            h = rearrange(h, "b (f s) d -> (b f) s d", f=num_frames)  # (B*F, S, D)
            return rearrange(self.mixer(h), "(b f) s d -> b (f s) d", f=num_frames)  # (B, F*S, D)
        tokens_per_frame = h.shape[1] // num_frames
        h = rearrange(h, "b (f s) d -> (b s) f d", f=num_frames)  # (B*S, F, D)
        return rearrange(self.mixer(h), "(b s) f d -> b (f s) d", s=tokens_per_frame)  # (B, F*S, D)


# ======================================================================================================================
# condition tokens (condition="tokens", DiS-style)
# ======================================================================================================================
# The n condition tokens (B, n, D) (timestep embedding, then the class embedding when class-conditional) are prepended
# to every sequence a block mixes, then split off again after the block:
#   spatial blocks : each frame's S tokens get the n tokens -> a frame-major clip of F "frames" of n+S tokens;
#   temporal blocks: each position's F tokens get them     -> a clip of n+F "frames" (the first n hold the condition
#                    tokens, broadcast over the S positions) of S tokens;
#   global blocks  : the clip's F*S tokens get them once    -> one "frame" of n+F*S tokens.
# The same extended layout serves attention (video_attention with the extended frame count and the block's axis) and
# Mamba (the block's rearrange yields exactly the prepended sequences). The block updates the condition tokens too:
# a spatial (temporal) block outputs one copy per frame (position); the copies are averaged back to (B, n, D), so the
# condition tokens evolve through depth as in DiS. They are dropped before the final layer.
def _prepend_condition_tokens(x, tokens, axis: str, num_frames: int):
    """x (B, F*S, D), tokens (B, n, D) -> (extended clip (B, F'*S', D), its frame count F')."""
    n = tokens.shape[1]
    if axis == "global":
        return torch.cat([tokens, x], dim=1), 1  # (B, n + F*S, D), one "frame"
    x = rearrange(x, "b (f s) d -> b f s d", f=num_frames)  # (B, F, S, D)
    if axis == "spatial":
        c = repeat(tokens, "b n d -> b f n d", f=num_frames)  # (B, F, n, D)
        x = torch.cat([c, x], dim=2)  # (B, F, n+S, D)
        return rearrange(x, "b f s d -> b (f s) d"), num_frames  # (B, F*(n+S), D)
    c = repeat(tokens, "b n d -> b n s d", s=x.shape[2])  # (B, n, S, D)
    x = torch.cat([c, x], dim=1)  # (B, n+F, S, D)
    return rearrange(x, "b f s d -> b (f s) d"), n + num_frames  # (B, (n+F)*S, D)


def _split_condition_tokens(x, n: int, axis: str, num_frames: int):
    """Inverse of ``_prepend_condition_tokens``: -> (x (B, F*S, D), tokens (B, n, D), copies averaged)."""
    if axis == "global":
        return x[:, n:], x[:, :n]  # (B, F*S, D), (B, n, D)
    if axis == "spatial":
        x = rearrange(x, "b (f s) d -> b f s d", f=num_frames)  # (B, F, n+S, D)
        return rearrange(x[:, :, n:], "b f s d -> b (f s) d"), x[:, :, :n].mean(dim=1)  # (B, F*S, D), (B, n, D)
    x = rearrange(x, "b (f s) d -> b f s d", f=n + num_frames)  # (B, n+F, S, D)
    return rearrange(x[:, n:], "b f s d -> b (f s) d"), x[:, :n].mean(dim=2)  # (B, F*S, D), (B, n, D)


# ======================================================================================================================
# final layer
# ======================================================================================================================
class FinalLayer(nn.Module):
    """LN -> adaLN (shift, scale) -> Linear(D, p*p*C_out); without modulation in condition="tokens" mode."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaln: bool, backend: str | None):
        super().__init__()
        self.backend = backend  # of the adaLN op
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = (nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
                                 if adaln else None)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(norm_modulate(self.norm_final, x, shift, scale, self.backend))  # (B, F*S, p*p*C_out)


# ======================================================================================================================
# the model
# ======================================================================================================================
def _signature_from_config(init):
    """Give ``__init__(self, **kwargs)`` the signature ``(self, *, <every MattenConfig field>=<its default>)``.

    diffusers' ``@register_to_config`` and ``from_pretrained`` read the config keys and defaults from the signature;
    deriving it from the dataclass keeps each default in one place (config.py).
    """
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
               for f in fields(MattenConfig)]
    init.__signature__ = inspect.Signature(params)
    return init


def _default_checkpoint(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class MattenTransformer3DModel(ModelMixin, ConfigMixin):
    """Matten video diffusion backbone, a diffusers ``ModelMixin`` (save/load with safetensors, gradient checkpointing).

    Constructor arguments: the fields of ``MattenConfig`` (keyword only). ``forward(hidden_states (B, C, F, H, W),
    timestep, class_labels=None)`` -> ``Transformer2DModelOutput(sample=(B, C_out, F, H, W))``, C_out = 2C with learned
    sigma (channels [0, C) epsilon, [C, 2C) the variance interpolation), as diffusers' ``LatteTransformer3DModel``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    @_signature_from_config
    def __init__(self, **kwargs):
        super().__init__()
        cfg = MattenConfig(**kwargs)  # validates every field
        self.matten_config = cfg
        self.layout = cfg.block_layout()  # the kind of every block, e.g. ("attn_spatial", "attn_temporal", ...)
        self.temporal_embedding_index = cfg.temporal_embedding_index()
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() flips it
        adaln = cfg.condition == "adan"
        D, F, S = cfg.hidden_size, cfg.num_frames, cfg.tokens_per_frame

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob) if cfg.num_classes > 0 else None
        triton_backend = _TRITON_BACKEND[cfg.kernel_backend]
        mamba_backend = _MAMBA_BACKEND[cfg.kernel_backend]
        blocks = []
        for kind in self.layout:
            family, axis = kind.split("_")
            if family == "attn":
                blocks.append(AttentionBlock(D, cfg.num_heads, cfg.mlp_ratio, axis, adaln, triton_backend,
                                             cfg.qk_norm))
            else:
                blocks.append(MambaBlock(D, axis, cfg, adaln, mamba_backend, triton_backend))
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels, adaln, triton_backend)
        # Fixed sin-cos position embeddings. Persistent buffers (as DiT's frozen pos_embed): a model built on the meta
        # device and materialised with to_empty() gets them back from the checkpoint like the weights.
        grid = cfg.sample_size // cfg.patch_size
        self.register_buffer("pos_embed_spatial", get_2d_sincos_pos_embed(D, grid))  # (S, D)
        self.register_buffer("pos_embed_temporal", get_1d_sincos_pos_embed(D, F))  # (F, D)
        assert self.pos_embed_spatial.shape == (S, D)
        self.initialize_weights()

    if "gradient_checkpointing_func" not in inspect.signature(ModelMixin.enable_gradient_checkpointing).parameters:
        def _set_gradient_checkpointing(self, module, value=False):  # diffusers < 0.32 calls this per module
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT/Latte initialisation, every step in one place (SPEC.md section 4)."""
        # BiMamba initialises its own SSM parameters (A_log, D, dt_proj weight and bias: Mamba's dt init; conv1d:
        # PyTorch's default) in BiMamba.reset_parameters(); nothing here touches them.
        mamba_dt = {id(m.dt_proj) for m in self.modules() if isinstance(m, BiMamba)}
        mamba_dt |= {id(m.dt_proj_b) for m in self.modules() if isinstance(m, BiMamba) and hasattr(m, "dt_proj_b")}
        # 1. every other Linear (attention, MLP, BiMamba's in_proj/x_proj/out_proj, modulations, final): xavier
        #    uniform weight, zero bias (DiT's _basic_init).
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in mamba_dt:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # 2. patch embedding: xavier uniform on the conv weight seen as a Linear (C*p*p -> D), zero bias.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, C*p*p)
        nn.init.zeros_(self.x_embedder.proj.bias)
        # 3. timestep MLP and class table: normal(0, 0.02).
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # 4. zero the adaLN modulation of attention blocks and the M-AdaN of Mamba blocks: gates start at 0, so
        #    every block starts as the identity (adaLN-Zero).
        for block in self.blocks:
            if block.adaLN_modulation is not None:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # 5. zero the final layer (its modulation and its output Linear): the model starts by predicting 0.
        if self.final_layer.adaLN_modulation is not None:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # 6. q/k norms (qk_norm only): unit scale.
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    # ---- input checks ------------------------------------------------------------------------------------------------
    def _check_inputs(self, hidden_states, class_labels) -> None:
        cfg = self.matten_config
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 5:
            raise ValueError(f"hidden_states must be (batch, channels, frames, height, width), got shape "
                             f"{tuple(hidden_states.shape)}")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got {hidden_states.dtype}")
        B, C, F, H, W = hidden_states.shape
        if C != cfg.in_channels:
            raise ValueError(f"hidden_states has {C} channels (shape {tuple(hidden_states.shape)}); the model "
                             f"expects in_channels={cfg.in_channels}")
        if F != cfg.num_frames:
            raise ValueError(f"hidden_states has {F} frames (shape {tuple(hidden_states.shape)}); the model "
                             f"expects num_frames={cfg.num_frames} (its temporal position embedding has that length)")
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"hidden_states spatial size {H}x{W} is not divisible by patch_size={cfg.patch_size}")
        if H != cfg.sample_size or W != cfg.sample_size:
            raise ValueError(f"hidden_states spatial size {H}x{W} does not match the model's sample_size="
                             f"{cfg.sample_size} (latent height = width)")
        if B == 0:
            raise ValueError("hidden_states has an empty batch")
        if cfg.num_classes == 0:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional model (num_classes=0)")
            return
        if class_labels is None:
            raise ValueError(f"class_labels are required: the model is class-conditional (num_classes="
                             f"{cfg.num_classes}); pass the null class {cfg.num_classes} for unconditional samples")
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels must be a torch.Tensor of class indices, got {type(class_labels).__name__}")
        if class_labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"class_labels must be an integer tensor, got {class_labels.dtype}")
        if tuple(class_labels.shape) != (B,):
            raise ValueError(f"class_labels must have shape ({B},), got {tuple(class_labels.shape)}")
        if class_labels.device != hidden_states.device:
            raise ValueError(f"class_labels are on {class_labels.device}, hidden_states on {hidden_states.device}")
        # The range check reads the values: done for CPU labels only (on CUDA it would synchronise the host; there an
        # out-of-range label fails in the embedding lookup's device-side assert instead).
        if class_labels.device.type == "cpu" and not _compiling():
            top = cfg.num_classes if cfg.class_dropout_prob > 0 else cfg.num_classes - 1  # the null class is valid
            bad = (class_labels < 0) | (class_labels > top)
            if bool(bad.any()):
                raise ValueError(f"class_labels must be in [0, {top}] (num_classes={cfg.num_classes}"
                                 f"{', plus the null class' if top == cfg.num_classes else ''}), got "
                                 f"{class_labels[bad].tolist()}")

    @staticmethod
    def _timesteps(timestep, batch: int, device) -> torch.Tensor:
        """A number, a 0-d tensor, or (1,) / (B,) tensor -> (B,) tensor on ``device``."""
        if not isinstance(timestep, torch.Tensor):
            if not isinstance(timestep, (int, float)) or isinstance(timestep, bool):
                raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
            return torch.full((batch,), float(timestep), dtype=torch.float32, device=device)  # a fill, no copy
        timestep = timestep.to(device).reshape(-1)  # (1,) or (B,)
        if timestep.shape[0] == 1:
            return timestep.expand(batch)  # (B,)
        if timestep.shape[0] != batch:
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {timestep.shape[0]} values")
        return timestep

    # ---- forward -----------------------------------------------------------------------------------------------------
    def _run_block(self, block, x, c, num_frames):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            checkpoint = getattr(self, "_gradient_checkpointing_func", None) or _default_checkpoint
            return checkpoint(block, x, c, num_frames)
        return block(x, c, num_frames)

    def forward(self, hidden_states: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """hidden_states (B, C, F, H, W), timestep (B,) or scalar, class_labels (B,) int -> (B, C_out, F, H, W).

        Class labels range over [0, num_classes); ``num_classes`` itself is the null class (with class dropout).
        """
        self._check_inputs(hidden_states, class_labels)
        cfg = self.matten_config
        B, F = hidden_states.shape[0], hidden_states.shape[2]
        S = cfg.tokens_per_frame

        x = self.x_embedder(hidden_states)  # (B, F*S, D) frame-major
        # (F*S, D): the frame's table for every frame. The fp32 table promotes x to fp32 under autocast (the patch
        # conv gives bf16 there), so the residual stream stays fp32 as in DiT.
        x = x + self.pos_embed_spatial.repeat(F, 1)  # + (F*S, D) -> (B, F*S, D)
        t = self.t_embedder(self._timesteps(timestep, B, hidden_states.device))  # (B, D)
        y = self.y_embedder(class_labels) if self.y_embedder is not None else None  # (B, D)
        if cfg.condition == "adan":
            c, tokens = (t if y is None else t + y), None  # (B, D)
        else:
            c, tokens = None, torch.stack([t] if y is None else [t, y], dim=1)  # (B, n, D)

        for i, (kind, block) in enumerate(zip(self.layout, self.blocks)):
            if i == self.temporal_embedding_index:
                x = x + self.pos_embed_temporal.repeat_interleave(S, dim=0)  # (F*S, D): row f for frame f
            if tokens is None:
                x = self._run_block(block, x, c, F)  # (B, F*S, D)
            else:
                axis, n = kind.split("_")[1], tokens.shape[1]
                x, frames = _prepend_condition_tokens(x, tokens, axis, F)  # (B, F'*S', D)
                x = self._run_block(block, x, None, frames)
                x, tokens = _split_condition_tokens(x, n, axis, F)  # (B, F*S, D), (B, n, D)

        x = self.final_layer(x, c)  # (B, F*S, p*p*C_out)
        p, h = cfg.patch_size, cfg.sample_size // cfg.patch_size
        out = rearrange(x, "b (f h w) (p q c) -> b c f (h p) (w q)", f=F, h=h, p=p, q=p)  # (B, C_out, F, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def forward_with_cfg(self, hidden_states, timestep, class_labels, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batched forward (DiT).

        The batch is two halves: ``hidden_states[:B/2]`` is used for both (the second half of the input is ignored);
        ``class_labels`` = (labels, null class ``num_classes`` repeated). The guided epsilon
        ``uncond + cfg_scale * (cond - uncond)`` fills both halves; the learned-sigma channels [C, 2C) are passed
        through unguided. Returns (B, C_out, F, H, W).
        """
        cfg = self.matten_config
        if cfg.num_classes == 0 or cfg.class_dropout_prob <= 0:
            raise ValueError("forward_with_cfg needs a class-conditional model with a null class "
                             "(num_classes > 0 and class_dropout_prob > 0)")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 1 or hidden_states.shape[0] % 2:
            raise ValueError("forward_with_cfg: hidden_states must have an even batch (conditional half, "
                             "unconditional half)")
        half = hidden_states[: hidden_states.shape[0] // 2]  # (B/2, C, F, H, W)
        combined = torch.cat([half, half], dim=0)  # (B, C, F, H, W)
        model_out = self.forward(combined, timestep, class_labels).sample  # (B, C_out, F, H, W)
        C = cfg.in_channels
        eps, rest = model_out[:, :C], model_out[:, C:]  # (B, C, ...), (B, C_out - C, ...)
        cond_eps, uncond_eps = torch.split(eps, eps.shape[0] // 2, dim=0)  # 2 x (B/2, C, F, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (B/2, C, F, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (B, C, F, H, W)
        return torch.cat([eps, rest], dim=1)  # (B, C_out, F, H, W)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


# ======================================================================================================================
# position embeddings (fixed sin-cos)
# ======================================================================================================================
def get_1d_sincos_pos_embed(dim: int, length: int) -> torch.Tensor:
    """(length, dim): position i -> [sin(i * w_k), cos(i * w_k)], w_k = 10000^(-k / (dim/2)), k < dim/2."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    pos = torch.arange(length, dtype=torch.float64)
    out = pos[:, None] * omega[None]  # (length, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()  # (length, dim)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim), row-major patches: the first half of the channels encodes the row, the second the column."""
    rows = get_1d_sincos_pos_embed(dim // 2, grid_size)  # (h, D/2)
    cols = get_1d_sincos_pos_embed(dim // 2, grid_size)  # (w, D/2)
    emb_rows = repeat(rows, "h d -> (h w) d", w=grid_size)  # (S, D/2)
    emb_cols = repeat(cols, "w d -> (h w) d", h=grid_size)  # (S, D/2)
    return torch.cat([emb_rows, emb_cols], dim=1)  # (S, D)


# ======================================================================================================================
# presets
# ======================================================================================================================
def create_model(name: str = "Matten-XL/2", **overrides) -> MattenTransformer3DModel:
    """``MattenTransformer3DModel`` from the preset ``name`` (``matten.config.MATTEN_CONFIGS``) with ``overrides``.

    Counting parameters of a big preset without memory: ``with torch.device("meta"): model = create_model(...)``.
    """
    return MattenTransformer3DModel(**get_config(name, **overrides).to_dict())


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
