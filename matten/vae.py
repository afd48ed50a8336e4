"""The frame autoencoder: diffusers ``AutoencoderKL`` in the Stable Diffusion v1-4 configuration, applied per frame.

Weights come only from a local path (``--vae PATH``): nothing is downloaded. ``PATH`` may be a diffusers
``AutoencoderKL`` folder (``config.json`` + weights), a Stable Diffusion pipeline folder with a ``vae/`` sub-folder,
or a single ``.safetensors`` file of the v1-4 VAE state dict. ``--vae none`` trains and samples in pixel space.
"""

from __future__ import annotations

import logging
import os

import torch
from einops import rearrange

logger = logging.getLogger("matten.vae")

# Stable Diffusion v1-4 VAE (CompVis/stable-diffusion-v1-4, subfolder "vae"); latents are scaled by 0.18215.
SD_V1_4_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD_SCALING_FACTOR = 0.18215
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_autoencoder(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32):
    """Load an ``AutoencoderKL`` from the local ``path`` (see the module docstring); never downloads.

    Raises ``FileNotFoundError`` naming ``path`` when it or its weights are missing.
    """
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vae {path!r}: no such file or folder. Give a local AutoencoderKL folder (config.json "
                                "+ diffusion_pytorch_model.safetensors), e.g. the 'vae' folder of "
                                "CompVis/stable-diffusion-v1-4, or --vae none for pixel space; nothing is downloaded.")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"--vae {path!r}: a single-file VAE must be a .safetensors state dict")
        from safetensors.torch import load_file

        vae = AutoencoderKL(**SD_V1_4_VAE_CONFIG)
        missing, unexpected = vae.load_state_dict(load_file(path), strict=False)
        if missing or unexpected:
            raise ValueError(f"--vae {path!r} is not an SD v1-4 AutoencoderKL state dict: {len(missing)} missing keys "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        return vae.to(torch_dtype)
    folder = path
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "vae")):
        folder = os.path.join(folder, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"--vae {path!r}: no config.json in {folder!r} (expected a diffusers AutoencoderKL folder)")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in _WEIGHT_NAMES):
        raise FileNotFoundError(f"--vae {path!r}: no weights in {folder!r} (expected one of {list(_WEIGHT_NAMES)}); "
                                "nothing is downloaded")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)


class VideoVAE(torch.nn.Module):
    """Encode/decode videos ``(B, 3, F, H, W)`` <-> scaled latents ``(B, 4, F, H/8, W/8)`` frame by frame, ``chunk_size``
    frames per autoencoder call to bound memory. Latents are multiplied by ``scaling_factor`` (0.18215 for SD v1-4)."""

    def __init__(self, autoencoder, scaling_factor: float | None = None):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        cfg_scale = getattr(autoencoder.config, "scaling_factor", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else (cfg_scale or SD_SCALING_FACTOR))
        self.latent_channels = int(autoencoder.config.latent_channels)
        self.downsample_factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)

    @classmethod
    def from_path(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> "VideoVAE":
        return cls(load_autoencoder(path, torch_dtype))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, chunk_size: int = 16, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1] -> scaled latents ``(B, C, F, H/f, W/f)`` (a posterior sample, or its mean
        with ``sample=False``)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must have shape (B, 3, F, H, W), got {tuple(video.shape)}")
        b = video.shape[0]
        frames = rearrange(video, "b c f h w -> (b f) c h w")  # (B*F, 3, H, W)
        dtype = next(self.autoencoder.parameters()).dtype
        out = []
        for chunk in frames.split(max(1, chunk_size)):
            dist = self.autoencoder.encode(chunk.to(dtype)).latent_dist
            out.append(dist.sample(generator) if sample else dist.mean)
        latents = torch.cat(out).float() * self.scaling_factor  # (B*F, C, h, w)
        return rearrange(latents, "(b f) c h w -> b c f h w", b=b)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
        """Scaled latents ``(B, C, F, h, w)`` -> video ``(B, 3, F, h*f, w*f)`` (values about [-1, 1], unclamped)."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (B, {self.latent_channels}, F, h, w), got {tuple(latents.shape)}")
        b = latents.shape[0]
        z = rearrange(latents, "b c f h w -> (b f) c h w") / self.scaling_factor  # (B*F, C, h, w)
        dtype = next(self.autoencoder.parameters()).dtype
        out = [self.autoencoder.decode(chunk.to(dtype)).sample for chunk in z.split(max(1, chunk_size))]
        return rearrange(torch.cat(out).float(), "(b f) c h w -> b c f h w", b=b)


def load_vae(spec: str | None, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32):
    """``--vae`` value -> :class:`VideoVAE` on ``device``, or ``None`` for ``"none"``/``None`` (pixel space)."""
    if spec is None or str(spec).lower() == "none":
        return None
    return VideoVAE.from_path(spec, torch_dtype).to(device)
