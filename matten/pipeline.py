"""``MattenPipeline``: a diffusers ``DiffusionPipeline`` of (transformer, scheduler, optional VAE) that samples clips.

Also the loaders used by the sample command: a trained model folder (``save_pretrained`` layout, as the training run
exports its EMA weights), a training output folder, or the embedded demo model shipped in ``matten/assets/``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .diffusion import make_scheduler

logger = logging.getLogger("matten.pipeline")

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
DEMO_WEIGHTS = os.path.join(ASSETS_DIR, "matten_demo.safetensors")
DEMO_CONFIG = os.path.join(ASSETS_DIR, "matten_demo.json")
SAMPLING_FILE = "matten_sampling.json"  # written next to exported weights: data space, class names, sampler defaults


@dataclass
class MattenPipelineOutput(BaseOutput):
    """``frames``: ``(B, F, H, W, 3)``, uint8 numpy (``output_type="np"``) or float in [0, 1] (``"pt"``);
    ``class_labels``: the labels sampled with (``None`` for an unconditional model)."""

    frames: np.ndarray | torch.Tensor
    class_labels: torch.Tensor | None = None


class MattenPipeline(DiffusionPipeline):
    """Sample videos from a Matten transformer.

    ``transformer``: a :class:`matten.MattenTransformer3DModel` (learned sigma: output ``(B, 2C, F, H, W)``);
    ``scheduler``: a diffusers ``DDPMScheduler`` (``variance_type="learned_range"``: the whole output is passed) or
    any eps-prediction scheduler such as ``DDIMScheduler`` (the variance half is dropped); ``vae``: an
    ``AutoencoderKL`` decoding latents frame by frame, or ``None`` when the model works in pixel space.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    def _class_labels(self, class_labels, batch_size, generator, device):
        num_classes = int(getattr(self.transformer.config, "num_classes", 0) or 0)
        if num_classes == 0:
            if class_labels is not None:
                raise ValueError("class_labels given, but the transformer is unconditional (num_classes=0)")
            return None
        if class_labels is None:  # draw labels, reproducibly from the generator
            g = generator[0] if isinstance(generator, list) else generator
            labels = torch.randint(0, num_classes, (batch_size,), generator=g,
                                   device=g.device if g is not None else "cpu")
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(batch_size)
            if labels.numel() != batch_size:
                raise ValueError(f"class_labels must hold 1 or batch_size={batch_size} labels, got {labels.numel()}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels.to(device)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int = 50,
                 guidance_scale: float = 1.0, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "np", decode_chunk_size: int = 16,
                 return_dict: bool = True, cuda_graph: bool = False):
        """Generate ``batch_size`` clips.

        ``guidance_scale`` > 1 applies classifier-free guidance to eps (class-conditional models; the variance half
        comes from the conditional branch): ``eps = eps_null + s (eps_cond - eps_null)``, with the null class
        ``num_classes`` (the label dropout class). ``latents``: initial noise ``(B, C, F, H, W)`` (drawn if None).
        ``cuda_graph``: run the denoiser's forward as a captured CUDA graph (CUDA only; the same results without the
        host's per-kernel launch cost: ``matten/cuda_graph.py``).
        """
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        cfg = self.transformer.config
        device = self._execution_device
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph=True needs the transformer on a CUDA device, it is on {device}")
        c, f, s = cfg.in_channels, cfg.num_frames, cfg.sample_size
        shape = (batch_size, c, f, s, s)
        labels = self._class_labels(class_labels, batch_size, generator, device)
        use_cfg = guidance_scale != 1.0
        if use_cfg and labels is None:
            raise ValueError("guidance_scale != 1 needs a class-conditional transformer (num_classes > 0)")
        if use_cfg and not float(getattr(cfg, "class_dropout_prob", 0.0)) > 0:
            raise ValueError("guidance_scale != 1 needs a model trained with label dropout (class_dropout_prob > 0), "
                             "which is what provides the null class")

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        learned_variance = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")
        learn_sigma = bool(getattr(cfg, "learn_sigma", True))
        if learned_variance and not learn_sigma:
            raise ValueError("a learned-variance scheduler needs a transformer with learn_sigma=True")
        if use_cfg:
            labels_in = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])  # (2B,): conditional, null
        else:
            labels_in = labels

        if cuda_graph:
            from .cuda_graph import CUDAGraphForward

            denoise = CUDAGraphForward(self.transformer)
        else:
            denoise = lambda x, t, class_labels: self.transformer(x, t, class_labels=class_labels).sample  # noqa: E731
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = torch.cat([x, x]) if use_cfg else x  # (B or 2B, C, F, H, W)
            x_in = self.scheduler.scale_model_input(x_in, t)
            t_in = t.reshape(1).expand(x_in.shape[0]).to(device)
            out = denoise(x_in, t_in, class_labels=labels_in).float()  # (., 2C or C, F, H, W)
            if use_cfg:
                cond, null = out[:batch_size], out[batch_size:]
                eps = null[:, :c] + guidance_scale * (cond[:, :c] - null[:, :c])
                out = torch.cat([eps, cond[:, c:]], dim=1)
            if not learned_variance:
                out = out[:, :c]  # schedulers without a learned variance take eps alone
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample

        if output_type == "latent":
            video = x
        else:
            if self.vae is not None:
                from .vae import VideoVAE

                video = VideoVAE(self.vae).decode(x, chunk_size=decode_chunk_size)
            else:
                video = x
            video = ((video.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 4, 1)  # (B, F, H, W, 3) in [0, 1]
            if output_type == "np":
                video = (video * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        if not return_dict:
            return (video,)
        return MattenPipelineOutput(frames=video, class_labels=labels)


# ----------------------------------------------------------------------------------------------------------------------
# Loading trained models
# ----------------------------------------------------------------------------------------------------------------------


def _model_class():
    from .model import MattenTransformer3DModel

    return MattenTransformer3DModel


def load_weights(model, state: dict) -> None:
    """Load ``state`` (converted to float32) into ``model``. Fixed buffers the file lacks (sin-cos position
    embeddings, recomputed from the configuration) keep their constructed values; a missing parameter or an
    unexpected key raises."""
    buffers = {name for name, _ in model.named_buffers()}
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    bad_missing = [k for k in missing if k not in buffers]
    if bad_missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {bad_missing[:5]} ({len(bad_missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")


def load_demo(device: str | torch.device = "cpu", **config_overrides):
    """The embedded demo model (``matten/assets``) -> (transformer, sampling metadata dict)."""
    from safetensors.torch import load_file

    if not (os.path.isfile(DEMO_WEIGHTS) and os.path.isfile(DEMO_CONFIG)):
        raise FileNotFoundError(f"the embedded demo model is missing ({DEMO_WEIGHTS}, {DEMO_CONFIG}); "
                                "pass --checkpoint PATH to sample from a trained model")
    with open(DEMO_CONFIG) as fh:
        meta = json.load(fh)
    config = dict(meta["model_config"], **config_overrides)
    model = _model_class().from_config(config)
    load_weights(model, load_file(DEMO_WEIGHTS))  # stored in half precision to stay small
    return model.to(device).eval(), meta.get("sampling", {})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", **config_overrides):
    """A trained model -> (transformer, sampling metadata dict).

    ``path``: a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), a training
    output folder (its ``ema/`` export is used), or a ``.safetensors`` file with a ``.json`` of the same name beside it
    (the embedded demo's format).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors.torch import load_file

        meta_path = path[: -len(".safetensors")] + ".json"
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"--checkpoint {path!r}: no {meta_path!r} with the model configuration beside it")
        with open(meta_path) as fh:
            meta = json.load(fh)
        model = _model_class().from_config(dict(meta["model_config"], **config_overrides))
        load_weights(model, load_file(path))
        return model.to(device).eval(), dict(meta.get("sampling", {}), training=meta.get("training", {}))
    if os.path.isdir(os.path.join(path, "ema")) and not os.path.isfile(os.path.join(path, "config.json")):
        path = os.path.join(path, "ema")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--checkpoint {path!r}: expected a model folder with config.json and "
                                "diffusion_pytorch_model.safetensors (a training run writes one to OUTPUT/ema), or a "
                                ".safetensors file with a .json beside it")
    model = _model_class().from_pretrained(path, low_cpu_mem_usage=False, **config_overrides)
    meta = {}
    if os.path.isfile(os.path.join(path, SAMPLING_FILE)):
        with open(os.path.join(path, SAMPLING_FILE)) as fh:
            meta = json.load(fh)
    return model.to(device).eval(), meta
