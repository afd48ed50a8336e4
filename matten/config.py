"""Matten configuration as data: one dataclass with commented defaults, the block layout of each variant, the presets.

``MattenConfig`` holds every architectural choice; ``MattenTransformer3DModel`` (model.py) carries the same fields
through diffusers' ``@register_to_config`` (its ``__init__`` signature is derived from this dataclass, so a default
lives in one place). ``MATTEN_CONFIGS`` names the presets of SPEC.md section 4 plus a tiny one for demos and tests.

Variants (SPEC.md section 4; ``MattenConfig.block_layout()`` is the single source of truth, docs/model.md explains
the choices). Block kinds: ``attn_spatial``, ``attn_temporal`` (Latte/DiT attention + MLP block, adaLN 6 chunks),
``mamba_global``, ``mamba_spatial``, ``mamba_temporal`` (bi-Mamba block with M-AdaN). With depth L:

* ``3`` (the paper's best): L/2 x (attn_spatial, attn_temporal, mamba_global).
* ``"latte"``: variant 3 without its Mamba blocks: L/2 x (attn_spatial, attn_temporal) = Latte.
* ``1`` (global bi-Mamba only): round(9L/4) x mamba_global.
* ``2`` (spatial and temporal bi-Mamba interleaved): round(9L/4) blocks alternating mamba_spatial, mamba_temporal.
* ``4`` (variant 3 without spatial attention): round(5L/6) x (attn_temporal, mamba_global).

The paper (Table 2) does not give the layouts of variants 1, 2 and 4, only their sizes at XL (814 / 814 / 846 M);
the block counts above are the simplest rules that land there: variants 1 and 2 hold the same blocks (the paper's
counts are equal) and 63 of them give 814.8M at XL; 23 (temporal attention, global Mamba) pairs give 850.0M (+0.5%).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

VARIANTS = (1, 2, 3, 4, "latte")
CONDITIONS = ("adan", "tokens")
KERNEL_BACKENDS = ("auto", "triton", "cuda", "ref")
BLOCK_KINDS = ("attn_spatial", "attn_temporal", "mamba_global", "mamba_spatial", "mamba_temporal")


@dataclass
class MattenConfig:
    # ---- size --------------------------------------------------------------------------------------------------------
    depth: int = 28  # L: attention blocks of the Latte skeleton; variant 3 holds L/2 triples (see block_layout)
    hidden_size: int = 1152  # D: token width (a multiple of 4 for the sin-cos embeddings)
    num_heads: int = 16  # attention heads; head_dim = D / heads <= 128 (video_attention's limit)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D (GELU tanh)
    # ---- input (latent video) ----------------------------------------------------------------------------------------
    patch_size: int = 2  # p: per-frame p x p patches (conv), S = (H/p)(W/p) tokens per frame
    in_channels: int = 4  # C: latent channels (SD VAE)
    num_frames: int = 16  # F: frames per clip (fixed: the temporal position embedding has F rows)
    sample_size: int = 32  # latent height = width (256 px through the SD VAE, factor 8)
    # ---- architecture ------------------------------------------------------------------------------------------------
    variant: int | str = 3  # 1, 2, 3, 4 or "latte" (module docstring; SPEC.md section 4)
    condition: str = "adan"  # "adan": adaLN / M-AdaN modulation; "tokens": DiS-style condition tokens
    qk_norm: bool = False  # RMS-normalise q and k per head (learned scale): not in the paper; bounds attention logits
    # ---- conditioning ------------------------------------------------------------------------------------------------
    num_classes: int = 0  # 0 = unconditional; > 0 adds a class embedding table
    class_dropout_prob: float = 0.1  # label dropout in training; > 0 also adds the null class used by CFG
    learn_sigma: bool = True  # output 2C channels (epsilon and the variance interpolation), as DiT/Latte
    # ---- bidirectional Mamba (Vision Mamba v2 mixer) -----------------------------------------------------------------
    d_state: int = 16  # N: SSM state size
    expand: int = 2  # E: d_inner = E * D
    d_conv: int = 4  # depthwise conv width
    dt_rank: int | str = "auto"  # R: "auto" = ceil(D / 16)
    # ---- kernels -----------------------------------------------------------------------------------------------------
    kernel_backend: str = "auto"  # "auto" (ref on CPU; on CUDA triton, the scan on a prebuilt CUDA extension where
    # it serves the shape: selective_scan's backend=None), "triton", "cuda" (scan) or "ref"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot build a model."""
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MattenConfig.{name} must be a positive int, got {v!r}")

        for name in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "num_frames", "sample_size",
                     "d_state", "expand", "d_conv"):
            positive_int(name)
        if self.variant not in VARIANTS or isinstance(self.variant, bool):
            raise ValueError(f"MattenConfig.variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"MattenConfig.condition must be one of {list(CONDITIONS)}, got {self.condition!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"MattenConfig.kernel_backend must be one of {list(KERNEL_BACKENDS)}, "
                             f"got {self.kernel_backend!r}")
        if self.variant in (3, "latte") and self.depth % 2:
            raise ValueError(f"MattenConfig.depth must be even for variant {self.variant!r} (L/2 repeats of the "
                             f"spatial/temporal pattern), got {self.depth}")
        if self.hidden_size % 4:
            raise ValueError(f"MattenConfig.hidden_size must be a multiple of 4 (sin-cos position embeddings), "
                             f"got {self.hidden_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"MattenConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.hidden_size // self.num_heads > 128:
            raise ValueError(f"MattenConfig: head_dim = hidden_size / num_heads = "
                             f"{self.hidden_size // self.num_heads} exceeds 128 (video_attention's limit)")
        if self.sample_size % self.patch_size:
            raise ValueError(f"MattenConfig.sample_size={self.sample_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"MattenConfig.qk_norm must be a bool, got {self.qk_norm!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"MattenConfig.num_classes must be an int >= 0, got {self.num_classes!r}")
        if not 0.0 <= float(self.class_dropout_prob) < 1.0:
            raise ValueError(f"MattenConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if not float(self.mlp_ratio) > 0:
            raise ValueError(f"MattenConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.dt_rank != "auto" and (isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int)
                                       or self.dt_rank < 1):
            raise ValueError(f"MattenConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")

    # ---- derived quantities ------------------------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.sample_size // self.patch_size) ** 2  # S

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def num_condition_tokens(self) -> int:
        """Condition tokens in ``condition="tokens"`` mode: the timestep, plus the class when class-conditional."""
        return 1 + (self.num_classes > 0)

    def block_layout(self) -> tuple[str, ...]:
        """The kind of every block, in order (module docstring). FLOPs accounting reads the same list."""
        L = self.depth
        if self.variant == 3:
            return ("attn_spatial", "attn_temporal", "mamba_global") * (L // 2)
        if self.variant == "latte":
            return ("attn_spatial", "attn_temporal") * (L // 2)
        if self.variant == 1:
            return ("mamba_global",) * _round_half_up(9 * L / 4)
        if self.variant == 2:
            return tuple(("mamba_spatial", "mamba_temporal")[i % 2] for i in range(_round_half_up(9 * L / 4)))
        if self.variant == 4:
            return ("attn_temporal", "mamba_global") * _round_half_up(5 * L / 6)
        raise AssertionError(self.variant)  # validate() rejects anything else

    def temporal_embedding_index(self) -> int:
        """The fixed temporal position embedding is added just before the first block that mixes frames.

        In variants 3, "latte" and 2 that is right after the first spatial block (Latte's choice); in variants 1 and 4
        the first block already mixes frames, so the embedding goes in with the spatial one, before block 0.
        """
        return next(i for i, kind in enumerate(self.block_layout()) if not kind.endswith("_spatial"))

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **overrides) -> "MattenConfig":
        return replace(self, **overrides)


def _round_half_up(x: float) -> int:
    return max(1, int(math.floor(x + 0.5)))


def config_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(MattenConfig))


# Presets (SPEC.md section 4): latent 16 x 4 x 32 x 32 (16 frames of 256 x 256 through the SD VAE), patch 2,
# unconditional, learned sigma. "Matten-T/2" is a tiny model whose CPU forward takes milliseconds (demos, tests).
MATTEN_CONFIGS: dict[str, MattenConfig] = {
    "Matten-S/2": MattenConfig(depth=12, hidden_size=384, num_heads=6),
    "Matten-B/2": MattenConfig(depth=12, hidden_size=768, num_heads=12),
    "Matten-L/2": MattenConfig(depth=24, hidden_size=1024, num_heads=16),
    "Matten-XL/2": MattenConfig(depth=28, hidden_size=1152, num_heads=16),
    "Matten-T/2": MattenConfig(depth=4, hidden_size=64, num_heads=4, num_frames=8, sample_size=16),
}

# The paper's Table 3 (parameters, millions, Matten variant 3) and Table 2 (variants at XL); info.py prints them
# beside ours. Latte-XL/2 (673.7M) is from the Latte paper.
PAPER_PARAMS_M = {
    ("Matten-S/2", 3): 35.0, ("Matten-B/2", 3): 164.0, ("Matten-L/2", 3): 579.0, ("Matten-XL/2", 3): 853.0,
    ("Matten-XL/2", 1): 814.0, ("Matten-XL/2", 2): 814.0, ("Matten-XL/2", 4): 846.0, ("Matten-XL/2", "latte"): 673.7,
}


def get_config(name: str, **overrides) -> MattenConfig:
    """The preset ``name`` with ``overrides`` applied (validated)."""
    if name not in MATTEN_CONFIGS:
        raise ValueError(f"unknown Matten preset {name!r}; expected one of {list(MATTEN_CONFIGS)}")
    unknown = set(overrides) - set(config_field_names())
    if unknown:
        raise ValueError(f"unknown MattenConfig field(s) {sorted(unknown)}; fields: {list(config_field_names())}")
    return replace(MATTEN_CONFIGS[name], **overrides)


def parameter_formula(config: MattenConfig) -> int:
    """Trainable parameters of ``MattenTransformer3DModel(config)``, counted by hand (SPEC.md section 4).

    For variant 3, unconditional, learned sigma, adaN, E=2, N=16, k=4, p=2, C=4 this is SPEC's closed form
    ``L(18D^2+15D) + (L/2)(9D^2 + 8DR + 223D) + 17D + D^2 + 258D + 2D^2 + 34D + 32``; tests check it against the
    model built on the meta device for every preset and variant.
    """
    c = config
    D, p, C, N, K = c.hidden_size, c.patch_size, c.in_channels, c.d_state, c.d_conv
    E, R, H = c.expand * D, c.resolved_dt_rank, int(c.mlp_ratio * D)
    adan = c.condition == "adan"
    attention = (3 * D * D + 3 * D) + (D * D + D) + (2 * c.head_dim if c.qk_norm else 0)  # qkv, proj, q/k norms
    mlp = (D * H + H) + (H * D + D)  # fc1, fc2
    attn_block = attention + mlp + (6 * D * D + 6 * D if adan else 0)  # + adaLN (6 chunks)
    direction = (E * K + E) + E * (R + 2 * N) + (R * E + E) + E * N + E  # conv1d, x_proj, dt_proj, A_log, D
    bimamba = D * 2 * E + E * D + 2 * direction  # in_proj, out_proj (no bias), two directions (v2)
    mamba_block = bimamba + (3 * D * D + 3 * D if adan else 0)  # + M-AdaN (gamma, beta, alpha)
    blocks = sum(attn_block if kind.startswith("attn") else mamba_block for kind in c.block_layout())
    patch = C * p * p * D + D  # conv patch embedding
    timestep = 256 * D + D + D * D + D  # sinusoid(256) -> Linear -> SiLU -> Linear
    label = (c.num_classes + (c.class_dropout_prob > 0)) * D if c.num_classes > 0 else 0  # (+ null class)
    final = (D * p * p * c.out_channels + p * p * c.out_channels) + (2 * D * D + 2 * D if adan else 0)
    return blocks + patch + timestep + label + final
