"""``python -m matten sample`` and ``python -m matten train`` through the real CLI parser (in-process, to keep CI
short; the dispatcher is the one ``python -m matten`` runs). Outputs are checked by reading them back."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageSequence

from matten.__main__ import main
from matten.pipeline import DEMO_CONFIG, DEMO_WEIGHTS


@pytest.fixture(autouse=True)
def _restore_threads():
    """The sample command sets torch to one CPU thread; leave the process as it was for the other tests."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _gif_frames(path):
    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def test_embedded_demo_is_small_and_complete():
    assert os.path.getsize(DEMO_WEIGHTS) <= 10 * 2**20
    with open(DEMO_CONFIG) as fh:
        meta = json.load(fh)
    cfg = meta["model_config"]
    print("demo config:", {k: cfg[k] for k in ("variant", "depth", "hidden_size", "patch_size", "num_frames",
                                              "sample_size", "num_classes")}, "training:", meta["training"])
    assert cfg["variant"] == 3 and cfg["learn_sigma"]
    assert meta["sampling"]["vae"] is None  # pixel space
    assert meta["training"]["steps"] > 0


def test_sample_from_the_embedded_demo(tmp_path, capsys):
    out = tmp_path / "demo.gif"
    assert main(["sample", "--output", str(out), "--steps", "2", "--seed", "1", "--class-label", "0"]) == 0
    frames = _gif_frames(out)
    with open(DEMO_CONFIG) as fh:
        cfg = json.load(fh)["model_config"]
    print(capsys.readouterr().out, frames.shape)
    assert frames.shape[0] == cfg["num_frames"] and frames.shape[1] % cfg["sample_size"] == 0
    assert frames.std() > 1.0  # not a blank clip


def test_train_then_sample_cli(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", "synthetic", "--preset", "Matten-T/2", "--depth", "2", "--hidden-size", "32",
            "--num-heads", "2", "--num-frames", "2", "--image-size", "4", "--kernel-backend", "ref",
            "--steps", "2", "--batch-size", "2", "--output", str(run), "--class-conditional", "--device", "cpu",
            "--export-demo", str(tmp_path / "small")]
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (run / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
    with open(run / "loss.csv") as fh:
        assert len(fh.read().strip().splitlines()) == 3  # header + 2 steps
    # sample from the training output (MP4, DDPM) and from the exported .safetensors (GIF, several clips)
    av = pytest.importorskip("av")
    assert main(["sample", "--checkpoint", str(run), "--output", str(tmp_path / "a.mp4"), "--steps", "2",
                 "--scheduler", "ddpm", "--class-label", "3", "--guidance-scale", "2"]) == 0
    with av.open(str(tmp_path / "a.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 2
    assert main(["sample", "--checkpoint", str(tmp_path / "small.safetensors"), "--output", str(tmp_path / "b.gif"),
                 "--steps", "2", "--num-samples", "4", "--scale", "2"]) == 0
    assert _gif_frames(tmp_path / "b.gif").shape == (2, 22, 22, 3)  # 2x2 grid of 4x4 clips, 1 px gaps, x2
    # continue training from the exported weights
    assert main(argv[:-2] + ["--output", str(tmp_path / "run2"), "--steps", "1", "--init-from",
                             str(tmp_path / "small.safetensors"), "--export-demo", str(tmp_path / "small2")]) == 0
    with open(tmp_path / "small2.json") as fh:
        assert json.load(fh)["training"]["continued_from"]["steps"] == 2
    with pytest.raises(ValueError, match="configuration differs"):
        main(argv[:-2] + ["--output", str(tmp_path / "run3"), "--depth", "4", "--init-from",
                          str(tmp_path / "small.safetensors")])
    with pytest.raises(SystemExit, match="class-label must be in"):
        main(["sample", "--checkpoint", str(run), "--output", str(tmp_path / "c.gif"), "--class-label", "9"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["sample", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "c.gif")])
