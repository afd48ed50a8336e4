"""Reading and writing video clips: GIF through Pillow, MP4 (and anything FFmpeg reads) through PyAV.

Frames travel as ``uint8`` arrays of shape ``(F, H, W, 3)``; :func:`to_uint8` converts model output in [-1, 1] or
[0, 1]. PyAV is imported only inside the functions that need it, so ``import matten`` works without it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _import_av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading and writing MP4 needs PyAV: pip install av  (or pip install 'matten[video]')") from exc
    return av


def to_uint8(video, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """A float tensor/array ``(..., H, W, 3)`` with values in ``value_range`` -> uint8 (uint8 input passes through).

    For a clip in the model layout ``(3, F, H, W)`` use :func:`clip_to_frames`.
    """
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    lo, hi = value_range
    video = (video.astype(np.float32) - lo) / (hi - lo)
    return (np.clip(video, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def clip_to_frames(clip: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """One clip in the model layout ``(C=3, F, H, W)`` (values in ``value_range``) -> uint8 ``(F, H, W, 3)``."""
    if clip.dim() != 4 or clip.shape[0] != 3:
        raise ValueError(f"clip must have shape (3, F, H, W), got {tuple(clip.shape)}")
    return to_uint8(clip.permute(1, 2, 3, 0), value_range)  # (F, H, W, 3)


def tile_videos(videos: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Several uint8 videos ``(N, F, H, W, 3)`` -> one grid video ``(F, H', W', 3)`` with ``pad`` black pixels between."""
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"videos must have shape (N, F, H, W, 3), got {videos.shape}")
    n, f, h, w, c = videos.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((f, nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=videos.dtype)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = videos[i]
    return grid


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``(F, H, W, 3)`` by an integer ``factor`` (tiny clips are unreadable at 1x)."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_gif(frames, path: str | os.PathLike, fps: float = 8.0) -> None:
    """Write uint8 frames ``(F, H, W, 3)`` as a looping GIF with Pillow."""
    from PIL import Image

    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {frames.shape}")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(os.fspath(path), save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0, optimize=False, disposal=2)


def write_mp4(frames, path: str | os.PathLike, fps: float = 8.0, codec: str = "libx264") -> None:
    """Write uint8 frames ``(F, H, W, 3)`` as an H.264 MP4 with PyAV (odd sizes are padded to even by edge copy)."""
    av = _import_av()
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {frames.shape}")
    h, w = frames.shape[1:3]
    # yuv420p needs even sizes
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(frames, path: str | os.PathLike, fps: float = 8.0) -> None:
    """Write ``frames`` to ``path``; the extension picks the format (``.gif`` or ``.mp4``)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".gif":
        write_gif(frames, path, fps)
    elif ext == ".mp4":
        write_mp4(frames, path, fps)
    else:
        raise ValueError(f"output {os.fspath(path)!r}: unknown extension {ext!r}; use .gif or .mp4")


def count_video_frames(path: str | os.PathLike) -> int:
    """Number of frames in a video file, counted by demuxing packets (no decoding), so a truncated file counts short.

    Raises whatever PyAV raises on an unreadable file.
    """
    av = _import_av()
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{os.fspath(path)!r} holds no video stream")
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_video_frames(path: str | os.PathLike, indices) -> np.ndarray:
    """Decode the frames at sorted ``indices`` of a video file -> uint8 ``(len(indices), H, W, 3)``.

    Decodes sequentially and stops after the last wanted frame; raises ``EOFError`` when the file ends early.
    """
    av = _import_av()
    wanted = list(indices)
    if wanted != sorted(wanted):
        raise ValueError("indices must be sorted")
    out, want_i, decoded = [], 0, 0
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            while want_i < len(wanted) and wanted[want_i] == i:
                out.append(frame.to_ndarray(format="rgb24"))
                want_i += 1
            if want_i == len(wanted):
                break
    if want_i < len(wanted):
        raise EOFError(f"{os.fspath(path)!r} ended after {decoded} decoded frames; wanted frame {wanted[want_i]}")
    return np.stack(out)


def read_image_frames(paths) -> np.ndarray:
    """Load image files as uint8 RGB ``(len(paths), H, W, 3)``."""
    from PIL import Image

    frames = []
    for p in paths:
        with Image.open(p) as im:
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)
