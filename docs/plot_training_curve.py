"""Draw the embedded demo's training curve (docs/demo_loss.csv -> docs/training_curve.png) with Pillow alone.

Usage: python docs/plot_training_curve.py [LOSS_CSV ...] [--out docs/training_curve.png]
Several CSVs are drawn one after the other (a run continued with --init-from); the loss is smoothed with a moving
average of 50 steps and drawn on a log scale, the raw per-step loss faintly behind it.
"""

import argparse
import math

import numpy as np
from PIL import Image, ImageDraw


def main():
    p = argparse.ArgumentParser()
    p.add_argument("csv", nargs="*", default=["docs/demo_loss.csv"])
    p.add_argument("--out", default="docs/training_curve.png")
    p.add_argument("--title", default="Matten demo (variant 3, 3.2M params) on synthetic moving shapes")
    args = p.parse_args()
    losses, breaks = [], []
    for path in args.csv:
        data = np.genfromtxt(path, delimiter=",", names=True)
        if losses:
            breaks.append(len(np.concatenate(losses)))
        losses.append(np.asarray(data["loss"], dtype=np.float64))
    loss = np.concatenate(losses)
    k = 50
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")

    W, H, L, R, T, B = 900, 500, 80, 20, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = math.floor(math.log10(loss.min())), math.ceil(math.log10(loss.max()))
    n = len(loss)

    def xy(i, v):
        x = L + (W - L - R) * i / max(n - 1, 1)
        y = T + (H - T - B) * (hi - math.log10(max(v, 10.0 ** lo))) / (hi - lo)
        return x, y

    for e in range(lo, hi + 1):  # decades
        _, y = xy(0, 10.0 ** e)
        d.line([(L, y), (W - R, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"1e{e}", fill="black")
    step = 10 ** max(0, int(math.log10(max(n, 1))) )
    for s in range(0, n + 1, step // 2 if n // step < 4 else step):
        x, _ = xy(s, 1.0)
        d.line([(x, H - B), (x, H - B + 5)], fill="black")
        d.text((x - 12, H - B + 8), str(s), fill="black")
    d.line([xy(i, v) for i, v in enumerate(loss)], fill=(190, 205, 235), width=1)
    d.line([xy(i + k - 1, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    for b in breaks:
        x, _ = xy(b, 1.0)
        d.line([(x, T), (x, H - B)], fill=(200, 80, 80), width=1)
        d.text((x + 4, T + 4), "continued (--init-from)", fill=(200, 80, 80))
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((L, 12), args.title, fill="black")
    d.text((W // 2 - 80, H - 25), "optimizer step", fill="black")
    d.text((L + 10, T + 10), f"loss = L_simple + L_vlb (per step; {k}-step mean); final mean {smooth[-1]:.4f}",
           fill=(20, 60, 160))
    img.save(args.out)
    print(f"wrote {args.out}: {n} steps, final {k}-step mean loss {smooth[-1]:.4f}")


if __name__ == "__main__":
    main()
