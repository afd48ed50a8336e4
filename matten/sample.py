"""``python -m matten sample``: generate clips with a trained Matten model (the embedded demo model by default) and
write them as a GIF or MP4.

``--checkpoint`` takes a training output folder (its EMA export in ``ema/``), a ``save_pretrained`` folder, or a
``.safetensors`` file with a ``.json`` beside it. Several samples (``--num-samples``) are tiled into one clip.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="trained model (training output folder, save_pretrained folder or .safetensors + .json); "
                             "default: the embedded demo model")
    parser.add_argument("--output", default="sample.gif", help="output file, .gif or .mp4 (default sample.gif)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, e.g. 25)")
    parser.add_argument("--scheduler", choices=["ddim", "ddpm"], default=None,
                        help="ddim (deterministic, eps only) or ddpm (learned-range variance); default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-label", type=int, default=None,
                        help="class index for a class-conditional model (default: random per sample)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale (class-conditional models; 1 = off; default: the model's)")
    parser.add_argument("--num-samples", type=int, default=None, help="clips, tiled in a grid (default: the model's)")
    parser.add_argument("--fps", type=float, default=None, help="frames per second of the output")
    parser.add_argument("--scale", type=int, default=None,
                        help="integer nearest-neighbour upscaling of the output (default: up to ~256 px)")
    parser.add_argument("--vae", default=None, help="override the VAE folder recorded with the model ('none' = pixels)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.add_argument("--kernel-backend", default=None, choices=["auto", "triton", "cuda", "ref"],
                        help="override the model's kernel backend")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, replay the denoiser's forward as a CUDA graph (default: on; same samples, "
                             "without the host's per-kernel launch cost)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on the CPU: 1; the reference scan is a loop of tiny ops "
                             "that OpenMP slows down badly on a busy machine: 14 s vs 380 s measured)")


def main(args: argparse.Namespace) -> int:
    from .diffusion import make_scheduler
    from .pipeline import MattenPipeline, load_checkpoint, load_demo
    from .vae import load_vae
    from .video_io import tile_videos, upscale, write_video

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in (".gif", ".mp4"):
        raise SystemExit(f"--output {args.output!r}: use a .gif or .mp4 file name")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(max(1, args.threads or 1))
    overrides = {"kernel_backend": args.kernel_backend} if args.kernel_backend else {}
    t0 = time.time()
    if args.checkpoint is None:
        transformer, meta = load_demo(device, **overrides)
        source = "embedded demo model"
    else:
        transformer, meta = load_checkpoint(args.checkpoint, device, **overrides)
        source = args.checkpoint
    vae_spec = args.vae if args.vae is not None else meta.get("vae")
    vae = load_vae(vae_spec, device=device)
    if vae is not None and vae.latent_channels != transformer.config.in_channels:
        raise SystemExit(f"the VAE has {vae.latent_channels} latent channels, the model {transformer.config.in_channels}")
    kind = args.scheduler or meta.get("scheduler", "ddim")
    scheduler = make_scheduler(kind, clip_sample=bool(meta.get("clip_sample", vae is None)))
    pipe = MattenPipeline(transformer=transformer, scheduler=scheduler,
                          vae=vae.autoencoder if vae is not None else None)
    pipe.set_progress_bar_config(desc=f"sampling ({kind})")

    conditional = int(transformer.config.num_classes or 0) > 0
    if args.class_label is not None and not conditional:
        raise SystemExit("--class-label given, but the model is unconditional")
    if args.class_label is not None and not 0 <= args.class_label < transformer.config.num_classes:
        raise SystemExit(f"--class-label must be in [0, {transformer.config.num_classes}), got {args.class_label}")
    guidance = args.guidance_scale if args.guidance_scale is not None else (
        meta.get("guidance_scale", 1.0) if conditional else 1.0)
    n = args.num_samples or meta.get("num_samples", 1)
    steps = args.steps or meta.get("steps", 50)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = pipe(batch_size=n, class_labels=args.class_label, num_inference_steps=steps, guidance_scale=guidance,
               generator=generator, output_type="np", cuda_graph=args.cuda_graph and device.type == "cuda")
    videos = out.frames  # (N, F, H, W, 3) uint8
    frames = videos[0] if n == 1 else tile_videos(videos)
    scale = args.scale or max(1, 256 // max(videos.shape[2:4]))
    frames = upscale(frames, scale)
    fps = args.fps or meta.get("fps", 8)
    write_video(frames, args.output, fps=fps)
    names = meta.get("class_names")
    labels = out.class_labels.tolist() if out.class_labels is not None else None
    described = [names[i] if names and i < len(names) else str(i) for i in labels] if labels else None
    print(f"wrote {args.output}: {n} clip(s) of {videos.shape[1]} frames at {videos.shape[2]}x{videos.shape[3]} "
          f"(x{scale}) from the {source}; {kind} {steps} steps"
          + (f", classes {described}, guidance {guidance}" if described else "")
          + f"; {time.time() - t0:.1f} s on {device}")
    return 0


__all__ = ["add_arguments", "main"]
