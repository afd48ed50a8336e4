"""Datasets of video clips for training: a video folder, a synthetic moving-shapes set, pre-encoded VAE latents.

Every dataset returns ``{"video": (C, F, H, W) float32, "label": int64}``: pixels in [-1, 1] (C = 3) or scaled VAE
latents (C = 4). Randomness (clip start, horizontal flip, synthetic parameters) comes from a generator seeded by
``(seed, epoch, index)``, never from global RNG state, so an item is a pure function of its index and the epoch: a
resumed run sees exactly the batches an uninterrupted run would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, count_video_frames, read_image_frames, read_video_frames

logger = logging.getLogger("matten.data")

LATENT_INDEX = "latents.json"


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, index)``."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1))
    return g


def resize_center_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    """``(F, C, H, W)`` float -> ``(F, C, size, size)``: resize the shorter side to ``size`` (bilinear, antialiased),
    then crop the centre."""
    f, c, h, w = video.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return video[:, :, top:top + size, left:left + size]


# ----------------------------------------------------------------------------------------------------------------------
# Video folder (UCF101 layout: root/<class name>/<video>.mp4, or root/<class name>/<video>/<frame>.png)
# ----------------------------------------------------------------------------------------------------------------------


def _probe(entry):
    """(path, kind) -> (number of frames, None) or (0, error message)."""
    path, kind = entry
    try:
        if kind == "frames":
            n = sum(1 for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            n = count_video_frames(path)
        return n, None
    except Exception as exc:  # noqa: BLE001 - any decoder error marks the file unreadable
        return 0, f"{type(exc).__name__}: {exc}"


class LabelledClips(Dataset):
    """What the three datasets share: class names, and items drawn from ``(seed, epoch, index)``, so that
    ``set_epoch`` (called by the training loop each epoch) gives every epoch new random choices."""

    class_names: list[str]
    seed: int
    epoch: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class VideoFolderDataset(LabelledClips):
    """Clips of ``num_frames`` frames, ``frame_interval`` apart, from every video under ``root``.

    Class labels come from the sorted sub-folder names of ``root`` (a flat folder is one class). A "video" is a file
    with a video extension (decoded by PyAV) or a folder of frame images (sorted by name). Unreadable, truncated or
    too-short videos are found when the dataset is built (packets are demuxed, not decoded) and skipped with one
    warning each; a decoding error later (a file that demuxes but does not decode) is warned about once and the item is
    replaced by the next readable one, so an epoch never crashes on a bad file.
    """

    def __init__(self, root: str | os.PathLike, num_frames: int = 16, frame_interval: int = 3, size: int = 256,
                 hflip: bool = True, seed: int = 0, probe_workers: int = 8):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        if num_frames < 1 or frame_interval < 1 or size < 1:
            raise ValueError(f"num_frames, frame_interval and size must be >= 1, got {num_frames}, {frame_interval}, {size}")
        self.root, self.num_frames, self.frame_interval, self.size = root, num_frames, frame_interval, size
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        self.span = (num_frames - 1) * frame_interval + 1  # frames a clip covers

        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                         and _find_videos(os.path.join(root, d)))
        if subdirs:
            self.class_names = subdirs
            candidates = [(p, k, label) for label, d in enumerate(subdirs) for p, k in _find_videos(os.path.join(root, d))]
        else:
            self.class_names = [os.path.basename(os.path.normpath(root))]
            candidates = [(p, k, 0) for p, k in _find_videos(root)]
        if not candidates:
            raise ValueError(f"data folder {root!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders")

        with ThreadPoolExecutor(max_workers=max(1, probe_workers)) as pool:
            probes = list(pool.map(_probe, [(p, k) for p, k, _ in candidates]))
        self.items = []  # (path, kind, label, number of frames)
        for (path, kind, label), (n, err) in zip(candidates, probes):
            if err is not None:
                logger.warning("skipping unreadable video %s (%s)", path, err)
            elif n < self.span:
                logger.warning("skipping video %s: %d frames, a clip needs %d (%d frames at interval %d)",
                               path, n, self.span, num_frames, frame_interval)
            else:
                self.items.append((path, kind, label, n))
        if not self.items:
            raise ValueError(f"data folder {root!r}: none of its {len(candidates)} videos is readable and long enough "
                             f"for {num_frames} frames at interval {frame_interval}")
        self._warned: set[str] = set()
        logger.info("video folder %s: %d clips-able videos in %d classes (%d skipped)", root, len(self.items),
                    len(self.class_names), len(candidates) - len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def load_clip(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """Decode one clip of item ``index`` -> float ``(3, F, size, size)`` in [-1, 1] (no flip)."""
        path, kind, _, n = self.items[index]
        start = int(torch.randint(0, n - self.span + 1, (1,), generator=generator))
        indices = list(range(start, start + self.span, self.frame_interval))
        if kind == "frames":
            names = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
            frames = read_image_frames([os.path.join(path, names[i]) for i in indices])
        else:
            frames = read_video_frames(path, indices)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, H, W) in [0, 255]
        video = resize_center_crop(video, self.size)
        video = (video / 127.5 - 1.0).clamp(-1.0, 1.0)
        return video.permute(1, 0, 2, 3).contiguous()  # (3, F, size, size)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            g = item_generator(self.seed, self.epoch, i)
            try:
                video = self.load_clip(i, g)
            except Exception as exc:  # noqa: BLE001 - a bad file must not end the epoch
                path = self.items[i][0]
                if path not in self._warned:
                    self._warned.add(path)
                    logger.warning("skipping video %s: decoding failed (%s: %s)", path, type(exc).__name__, exc)
                continue
            if self.hflip and bool(torch.rand((), generator=g) < 0.5):
                video = video.flip(-1)
            return {"video": video, "label": torch.tensor(self.items[i][2], dtype=torch.long)}
        raise RuntimeError(f"no video under {self.root!r} could be decoded")


def _find_videos(folder: str):
    """[(path, "video" | "frames")] directly inside ``folder``, sorted."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.lower().endswith(VIDEO_EXTENSIONS):
            found.append((path, "video"))
        elif os.path.isdir(path) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path)):
            found.append((path, "frames"))
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic moving shapes
# ----------------------------------------------------------------------------------------------------------------------

SHAPE_NAMES = ("circle", "square", "triangle", "cross")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB, inputs ``(B,)`` in [0, 1] -> ``(B, 3)``."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)  # (B, 3)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def sample_shape_params(n: int, num_classes: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> dict:
    """Random parameters of ``n`` synthetic clips (CPU tensors). ``labels`` (shape kinds) are drawn unless given."""
    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    if labels is None:
        labels = torch.randint(0, num_classes, (n,), generator=generator)
    radius = u(0.28, 0.42)
    # a smooth, varied path: per axis a sinusoid of random amplitude, frequency and phase (Lissajous-like)
    amp = u(0.15, 1.0, 2) * (1.0 - radius[:, None] - 0.05)
    freq = u(0.25, 0.9, 2) * torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0)  # radians per frame
    phase = u(0.0, 2 * math.pi, 2)
    return {
        "label": labels,
        "radius": radius,
        "amp": amp, "freq": freq, "phase": phase,
        "angle0": u(0.0, 2 * math.pi), "spin": u(-0.3, 0.3),  # radians, radians per frame
        "color": _hsv_to_rgb(u(0.0, 1.0), u(0.65, 1.0), u(0.8, 1.0)),  # (n, 3) in [0, 1]
        "background": u(0.0, 0.2, 1) * torch.tensor([1.0, 1.0, 1.0]) + u(0.0, 0.1, 3),  # (n, 3) dark
    }


def _box_sdf(px, py, bx, by):
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def render_shapes(params: dict, num_frames: int, size: int) -> torch.Tensor:
    """Render clips from :func:`sample_shape_params` -> ``(n, 3, num_frames, size, size)`` in [-1, 1].

    Coordinates are normalised to [-1, 1], so one set of parameters renders at any resolution; edges are
    antialiased over one pixel through a signed distance function per shape kind.
    """
    device = params["radius"].device
    t = torch.arange(num_frames, device=device, dtype=torch.float32)  # (F,)
    centre = params["amp"][:, None, :] * torch.sin(params["freq"][:, None, :] * t[None, :, None]
                                                   + params["phase"][:, None, :])  # (n, F, 2)
    angle = params["angle0"][:, None] + params["spin"][:, None] * t[None, :]  # (n, F)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1  # (size,)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (size, size)
    dx = gx[None, None] - centre[..., 0, None, None]  # (n, F, size, size)
    dy = gy[None, None] - centre[..., 1, None, None]
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    r = params["radius"][:, None, None, None]
    px, py = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r  # shape-local, the shape spans ~[-1, 1]

    sdf_circle = torch.sqrt(px ** 2 + py ** 2) - 1.0
    sdf_square = _box_sdf(px, py, 0.8, 0.8)
    # equilateral triangle of circumradius 1: three half-planes at 120 degrees
    sdf_triangle = torch.maximum(torch.maximum(-py - 0.5, 0.866 * px + 0.5 * py - 0.5), -0.866 * px + 0.5 * py - 0.5)
    sdf_cross = torch.minimum(_box_sdf(px, py, 1.0, 0.33), _box_sdf(px, py, 0.33, 1.0))
    sdf = torch.stack([sdf_circle, sdf_square, sdf_triangle, sdf_cross], dim=0)  # (4, n, F, size, size)
    label = params["label"].to(device) % len(SHAPE_NAMES)
    sdf = sdf.gather(0, label[None, :, None, None, None].expand(1, *sdf.shape[1:]))[0]  # (n, F, size, size)

    pixel = 2.0 / size
    alpha = (0.5 - sdf * r / pixel).clamp(0.0, 1.0)[:, None]  # (n, 1, F, size, size)
    color = params["color"].to(device)[:, :, None, None, None]  # (n, 3, 1, 1, 1)
    background = params["background"].to(device)[:, :, None, None, None]
    video = alpha * color + (1 - alpha) * background  # (n, 3, F, size, size) in [0, 1]
    return video * 2 - 1


class SyntheticShapesDataset(LabelledClips):
    """Moving shapes generated on the fly: one antialiased shape per clip on a dark background, drifting along a
    smooth Lissajous path while it spins; the class label is the shape kind (``SHAPE_NAMES[:num_classes]``).

    ``length`` is the nominal epoch size; items are pure functions of ``(seed, epoch, index)``, so every epoch shows
    new clips while a resumed run sees the same ones.
    """

    def __init__(self, num_frames: int = 16, size: int = 32, num_classes: int = 4, length: int = 100_000, seed: int = 0):
        if not 1 <= num_classes <= len(SHAPE_NAMES):
            raise ValueError(f"num_classes must be in [1, {len(SHAPE_NAMES)}], got {num_classes}")
        if num_frames < 1 or size < 4 or length < 1:
            raise ValueError(f"need num_frames >= 1, size >= 4, length >= 1; got {num_frames}, {size}, {length}")
        self.num_frames, self.size, self.length, self.seed, self.epoch = num_frames, size, length, seed, 0
        self.class_names = list(SHAPE_NAMES[:num_classes])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict]:
        """A whole batch in one vectorised render (the DataLoader calls this when it exists); parameters are still
        drawn per item from its own generator, so an item does not depend on the batch it is in."""
        per_item = [sample_shape_params(1, self.num_classes, item_generator(self.seed, self.epoch, i)) for i in indices]
        params = {k: torch.cat([p[k] for p in per_item]) for k in per_item[0]}
        video = render_shapes(params, self.num_frames, self.size)  # (n, 3, F, size, size)
        return [{"video": v, "label": l} for v, l in zip(video, params["label"])]


# ----------------------------------------------------------------------------------------------------------------------
# Pre-encoded VAE latents
# ----------------------------------------------------------------------------------------------------------------------


class LatentDataset(LabelledClips):
    """Latents written by :func:`encode_dataset`: one safetensors file per clip with ``latents`` (and, when the
    source flipped, ``latents_flipped``: the encoding of the mirrored clip, chosen half of the time)."""

    def __init__(self, root: str | os.PathLike, seed: int = 0):
        from safetensors.torch import load_file  # noqa: F401 - fail early when safetensors is missing

        root = os.fspath(root)
        index_path = os.path.join(root, LATENT_INDEX)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"latent folder {root!r} has no {LATENT_INDEX}; write one with "
                                    "`python -m matten train --data VIDEOS --vae VAE --encode-latents DIR`")
        with open(index_path) as f:
            self.meta = json.load(f)
        self.root, self.seed, self.epoch = root, seed, 0
        self.files = self.meta["files"]
        self.class_names = self.meta["class_names"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(self.root, self.files[index]))
        latents = tensors["latents"]
        if "latents_flipped" in tensors and bool(torch.rand((), generator=item_generator(self.seed, self.epoch, index)) < 0.5):
            latents = tensors["latents_flipped"]
        return {"video": latents.float(), "label": tensors["label"].long().reshape(())}


@torch.no_grad()
def encode_dataset(dataset: VideoFolderDataset, vae, out_dir: str | os.PathLike, batch_size: int = 4,
                   device: str | torch.device = "cpu", chunk_size: int = 16, num_workers: int = 0) -> int:
    """Encode every video of ``dataset`` (one clip each) with ``vae`` (a :class:`matten.vae.VideoVAE`) into
    ``out_dir``; with ``dataset.hflip`` the mirrored clip is encoded too. Returns the number of clips written."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hflip, dataset.hflip = dataset.hflip, False  # flipped versions are encoded explicitly below
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    files, n = [], 0
    try:
        for batch in tqdm(loader, desc="encoding latents"):
            video = batch["video"].to(device)
            latents = vae.encode(video, chunk_size=chunk_size).cpu()
            flipped = vae.encode(video.flip(-1), chunk_size=chunk_size).cpu() if hflip else None
            for j in range(video.shape[0]):
                name = f"clip_{n:07d}.safetensors"
                tensors = {"latents": latents[j].to(torch.float16).contiguous(), "label": batch["label"][j].reshape(1)}
                if flipped is not None:
                    tensors["latents_flipped"] = flipped[j].to(torch.float16).contiguous()
                save_file(tensors, os.path.join(out_dir, name))
                files.append(name)
                n += 1
    finally:
        dataset.hflip = hflip
    meta = {"files": files, "class_names": dataset.class_names, "num_frames": dataset.num_frames,
            "frame_interval": dataset.frame_interval, "size": dataset.size, "latent_shape": list(latents.shape[1:]),
            "scaling_factor": vae.scaling_factor, "source": dataset.root}
    with open(os.path.join(out_dir, LATENT_INDEX), "w") as f:
        json.dump(meta, f, indent=1)
    return n


def latent_size(size: int, vae) -> int:
    """Spatial size of the latents of ``size``-pixel frames (pixel space when ``vae`` is None)."""
    return size if vae is None else size // vae.downsample_factor


__all__ = ["VideoFolderDataset", "SyntheticShapesDataset", "LatentDataset", "encode_dataset", "render_shapes",
           "sample_shape_params", "SHAPE_NAMES", "resize_center_crop", "item_generator"]
