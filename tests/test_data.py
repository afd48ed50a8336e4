"""Datasets, video IO and the VAE wrapper on the CPU.

Real small MP4 files are written with PyAV, with bad ones among them (random bytes, a truncated file, a too-short
video); each bad file must be skipped with exactly one warning. Tolerance rule: decoded frames of lossy H.264 are
compared to the frames written with an absolute error of at most 8/255 on flat images (quantisation + chroma
subsampling); everything that does not pass through a codec (synthetic rendering, flips, chunked VAE calls in
float32) is compared exactly or to 1e-5.
"""

import logging
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from matten.data import (LatentDataset, SyntheticShapesDataset, VideoFolderDataset, encode_dataset,  # noqa: E402
                         render_shapes, resize_center_crop, sample_shape_params)
from matten.vae import VideoVAE, load_vae  # noqa: E402
from matten.video_io import read_video_frames, tile_videos, write_gif, write_mp4  # noqa: E402

CODEC_TOL = 8  # uint8 levels, see the module docstring


def _gray_video(n, h=24, w=32, left_right=False):
    """Frame i is flat gray level 20 + 10 i (or, with left_right, white left half and level 20 + 10 i right half)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = 20 + 10 * i
        if left_right:
            frames[i, :, : w // 2] = 255
    return frames


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "alpha").mkdir()
    (root / "beta").mkdir()
    write_mp4(_gray_video(12), root / "alpha" / "a0.mp4", fps=8)
    write_mp4(_gray_video(16, left_right=True), root / "alpha" / "a1.mp4", fps=8)
    write_mp4(_gray_video(12), root / "beta" / "b0.mp4", fps=8)
    # a folder of frame images counts as one video
    frames_dir = root / "beta" / "b1_frames"
    frames_dir.mkdir()
    from PIL import Image

    for i, f in enumerate(_gray_video(10)):
        Image.fromarray(f).save(frames_dir / f"{i:04d}.png")
    # bad files: random bytes, a truncated MP4, a video too short for a clip
    (root / "beta" / "corrupt.mp4").write_bytes(os.urandom(3000))
    noise = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    write_mp4(noise, root / "alpha" / "long.mp4", fps=8)
    data = (root / "alpha" / "long.mp4").read_bytes()
    (root / "alpha" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "alpha" / "long.mp4").unlink()
    write_mp4(_gray_video(3), root / "beta" / "short.mp4", fps=8)
    return root


def test_video_folder_skips_bad_files_with_one_warning_each(video_root, caplog):
    with caplog.at_level(logging.WARNING, logger="matten.data"):
        ds = VideoFolderDataset(video_root, num_frames=4, frame_interval=2, size=16, seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    print("warnings:", warnings)
    for bad in ("corrupt.mp4", "truncated.mp4", "short.mp4"):
        assert sum(bad in w for w in warnings) == 1, bad
    assert len(warnings) == 3
    assert ds.class_names == ["alpha", "beta"]
    names = sorted(os.path.basename(p) for p, *_ in ds.items)
    assert names == ["a0.mp4", "a1.mp4", "b0.mp4", "b1_frames"]
    # a whole epoch reads without error or new warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="matten.data"):
        items = [ds[i] for i in range(len(ds))]
    assert not caplog.records
    for it, (path, _, label, _) in zip(items, ds.items):
        assert it["video"].shape == (3, 4, 16, 16) and it["video"].dtype == torch.float32
        assert it["label"].item() == label
        assert -1.0 <= it["video"].min() and it["video"].max() <= 1.0


def test_video_folder_clip_frames_and_interval(video_root):
    ds = VideoFolderDataset(video_root, num_frames=4, frame_interval=2, size=16, hflip=False, seed=3)
    for i, (path, kind, _, n) in enumerate(ds.items):
        if os.path.basename(path) == "a1.mp4":
            continue  # not flat
        clip = ds[i]["video"]  # (3, F, 16, 16)
        levels = ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()  # per frame gray level
        steps = np.diff(levels)
        print(os.path.basename(path), "levels", levels.round(1))
        np.testing.assert_allclose(steps, 20.0, atol=CODEC_TOL)  # interval 2 x 10 levels per frame
        start = (levels[0] - 20) / 10
        assert -0.5 < start < n - 6 + 0.5  # the clip fits in the video


def test_video_folder_determinism_and_flip(video_root):
    ds = VideoFolderDataset(video_root, num_frames=3, frame_interval=1, size=16, hflip=True, seed=1)
    plain = VideoFolderDataset(video_root, num_frames=3, frame_interval=1, size=16, hflip=False, seed=1)
    i = next(i for i, it in enumerate(ds.items) if it[0].endswith("a1.mp4"))
    torch.testing.assert_close(ds[i]["video"], ds[i]["video"], rtol=0, atol=0)  # pure function of the index
    flipped = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        a, b = ds[i]["video"], plain[i]["video"]
        if torch.equal(a, b.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(a, b)
    print("flipped in", flipped, "of 12 epochs")
    assert 0 < flipped < 12


def test_resize_center_crop():
    video = torch.arange(2 * 3 * 20 * 40, dtype=torch.float32).reshape(2, 3, 20, 40)
    out = resize_center_crop(video, 10)
    assert out.shape == (2, 3, 10, 10)
    same = resize_center_crop(video[:, :, :, 10:30], 20)  # no resize: a pure centre crop
    torch.testing.assert_close(same, video[:, :, :, 10:30], rtol=0, atol=0)


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolderDataset(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="none of its 1 videos"):
        VideoFolderDataset(tmp_path, num_frames=2)


def test_synthetic_dataset():
    ds = SyntheticShapesDataset(num_frames=6, size=24, num_classes=3, length=50, seed=0)
    items = [ds[i] for i in range(24)]
    labels = torch.stack([it["label"] for it in items])
    assert set(labels.tolist()) <= {0, 1, 2} and len(set(labels.tolist())) == 3
    video = torch.stack([it["video"] for it in items])  # (24, 3, 6, 24, 24)
    assert video.shape == (24, 3, 6, 24, 24) and video.min() >= -1 and video.max() <= 1
    torch.testing.assert_close(ds[5]["video"], items[5]["video"], rtol=0, atol=0)
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["video"], items[5]["video"])  # new clips each epoch
    # smooth, visible motion: the shape's centroid moves between consecutive frames, but by less than a third of the frame
    fg = (video - video[..., :1, :1]).abs().sum(1)  # (24, F, H, W): distance from the corner (background) colour
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    w = fg / fg.sum(dim=(-1, -2), keepdim=True)
    centroid = torch.stack([(w * xs).sum((-1, -2)), (w * ys).sum((-1, -2))], -1)  # (24, F, 2)
    step = (centroid[:, 1:] - centroid[:, :-1]).norm(dim=-1)
    print("centroid step px: median", step.median().item(), "max", step.max().item())
    assert step.median() > 0.3 and step.max() < 8


def test_synthetic_classes_are_distinct_shapes():
    # the same motion and colour with each label: the masks differ (shape kind is what the label controls)
    g = torch.Generator().manual_seed(0)
    params = sample_shape_params(1, 4, g)
    masks = []
    for k in range(4):
        params["label"] = torch.tensor([k])
        v = render_shapes(params, 2, 32)[0]
        masks.append(((v - v[:, :, :1, :1]).abs().sum(0) > 0.5).float())
    for a in range(4):
        for b in range(a + 1, 4):
            assert (masks[a] != masks[b]).float().mean() > 0.01, (a, b)


def test_gif_and_mp4_round_trip(tmp_path):
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    for i in range(5):
        frames[i, :, : 8 * (i + 1)] = (200, 60, 30)
    write_gif(frames, tmp_path / "a.gif", fps=5)
    from PIL import Image, ImageSequence

    with Image.open(tmp_path / "a.gif") as im:
        gif = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    assert gif.shape == frames.shape
    assert np.abs(gif.astype(int) - frames).max() <= CODEC_TOL
    write_mp4(frames, tmp_path / "a.mp4", fps=5)
    back = read_video_frames(tmp_path / "a.mp4", range(5))
    err = np.abs(back.astype(int) - frames)
    print("mp4 round trip: max err", err.max(), "mean", err.mean())
    assert back.shape == frames.shape and err.mean() < 4
    grid = tile_videos(np.stack([frames, frames, frames]))
    assert grid.shape == (5, 2 * 33 + 1, 2 * 49 + 1, 3)
    with pytest.raises(EOFError):
        read_video_frames(tmp_path / "a.mp4", [0, 9])


# ---------------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=16, scaling_factor=0.18215)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path


def test_vae_load_encode_decode_chunks(tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir))
    assert isinstance(vae, VideoVAE) and vae.scaling_factor == 0.18215 and vae.downsample_factor == 2
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    z_all = vae.encode(video, chunk_size=100, sample=False)
    z_1 = vae.encode(video, chunk_size=1, sample=False)
    z_3 = vae.encode(video, chunk_size=3, sample=False)
    assert z_all.shape == (2, 4, 5, 8, 8)
    print("chunked encode max diff", (z_all - z_1).abs().max().item())
    torch.testing.assert_close(z_1, z_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_3, z_all, rtol=1e-5, atol=1e-5)
    # scaling: the latents are the posterior mean of frame f of clip b, times 0.18215
    mean = vae.autoencoder.encode(video[1, :, 2][None]).latent_dist.mean
    torch.testing.assert_close(z_all[1, :, 2], mean[0] * 0.18215, rtol=1e-5, atol=1e-5)
    x = vae.decode(z_all, chunk_size=2)
    assert x.shape == (2, 3, 5, 16, 16)
    torch.testing.assert_close(x[0, :, 4], vae.autoencoder.decode(z_all[0, :, 4][None] / 0.18215).sample[0],
                               rtol=1e-5, atol=1e-5)
    assert load_vae("none") is None and load_vae(None) is None


def test_vae_errors_name_the_path(tmp_path, tiny_vae_dir):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        load_vae(str(missing))
    empty = tmp_path / "empty_vae"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_vae_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="empty_vae.*no weights"):
        load_vae(str(empty))
    # an SD pipeline folder with a vae/ sub-folder is accepted
    sd = tmp_path / "sd"
    sd.mkdir()
    os.symlink(tiny_vae_dir, sd / "vae")
    assert load_vae(str(sd)).latent_channels == 4


def test_encode_dataset_and_latent_dataset(video_root, tiny_vae_dir, tmp_path):
    vae = load_vae(str(tiny_vae_dir))
    ds = VideoFolderDataset(video_root, num_frames=4, frame_interval=2, size=16, hflip=True, seed=0)
    n = encode_dataset(ds, vae, tmp_path / "lat", batch_size=3, chunk_size=3)
    assert n == len(ds) and ds.hflip  # the flag is restored
    lat = LatentDataset(tmp_path / "lat")
    assert len(lat) == n and lat.class_names == ["alpha", "beta"] and lat.meta["latent_shape"] == [4, 4, 8, 8]
    labels = sorted(lat[i]["label"].item() for i in range(n))
    assert labels == sorted(it[2] for it in ds.items)
    assert lat[0]["video"].shape == (4, 4, 8, 8) and lat[0]["video"].dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="latents.json"):
        LatentDataset(tmp_path)
