"""``python -m data_tools.inspect FILE``: what one HDF5 file holds, and optionally a picture of it.

    python -m data_tools.inspect data/fmnist/train-00000-of-00004.h5
    python -m data_tools.inspect data/fmnist/test.h5 --grid samples.png --count 48

The summary gives counts, the stored (training) mean/std and this file's own,
and two text histograms: samples per class, and pixel values (the share of
all pixels in each of 8 bins of 32 grey levels).  ``--grid`` needs
matplotlib, imported only then.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data_tools import h5format
from data_tools.atomic import temp_path
from data_tools.errors import DataError, run_cli


PIXEL_BINS = 8  # of 256 // PIXEL_BINS grey levels each
BAR = 30  # characters of the longest bar


def bar(value: float, top: float) -> str:
    return "#" * round(BAR * value / top) if top > 0 else ""


def pixel_histogram(images: np.ndarray) -> np.ndarray:
    """Share of all pixels in each of PIXEL_BINS equal bins of the 0..255 grey levels (sums to 1)."""
    counts = np.bincount(images.ravel(), minlength=256).reshape(PIXEL_BINS, -1).sum(axis=1)
    return counts / max(counts.sum(), 1)


def summarize(path: Path, images: np.ndarray, labels: np.ndarray, attrs: dict) -> str:
    """A few lines for a person: who, how many, what pixel statistics; class and pixel histograms."""
    names = attrs["class_names"]
    counts = np.bincount(labels, minlength=len(names))
    pixels = images.astype(np.float64) / 255.0 if len(images) else np.zeros(1)
    where = f"shard index {attrs['shard_index']} of {attrs['shard_count']}" if attrs["split"] == "train" else attrs["split"]
    h, w, c = attrs["image_shape"]
    channels = {1: "grayscale", 3: "RGB"}.get(c, f"{c} channels")
    stored_mean, stored_std = ",".join(f"{v:.4f}" for v in attrs["mean"]), ",".join(f"{v:.4f}" for v in attrs["std"])
    lines = [
        f"{path}: {attrs['dataset']} {where}, {len(labels)} samples of {h}x{w} {channels}",
        f"totals: {attrs['num_train_total']} train, {attrs['num_val_total']} val, {attrs['num_test_total']} test; "
        f"seed {attrs['seed']}, stratified {attrs['stratified']}, sharding_id {attrs['sharding_id'][:12]}",
        f"mean/std: stored (training set, per channel) {stored_mean}/{stored_std}, "
        f"this file (all channels) {pixels.mean():.4f}/{pixels.std():.4f}",
        "classes (samples per class):",
    ]
    width = max(len(n) for n in names)
    lines += [f"  {i:3d} {name:<{width}} {int(c):7d}  {bar(c, counts.max())}"
              for i, (name, c) in enumerate(zip(names, counts))]
    if len(images):
        share, step = pixel_histogram(images), 256 // PIXEL_BINS
        lines.append(f"pixel values (share of all pixels, bins of {step} grey levels):")
        lines += [f"  {lo:3d}-{lo + step - 1:<3d} {s * 100:6.2f}%  {bar(s, share.max())}"
                  for lo, s in zip(range(0, 256, step), share)]
    return "\n".join(line.rstrip() for line in lines)


def save_grid(out: Path, images: np.ndarray, labels: np.ndarray, names: list[str], count: int, seed: int) -> None:
    """A grid of ``count`` random samples titled with their labels, written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    if not out.parent.is_dir():
        raise DataError(f"--grid {out}: folder {out.parent} does not exist")
    pick = np.sort(np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False))
    cols = min(8, len(pick))
    rows = -(-len(pick) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), pick):
        image = images[i]
        if image.ndim == 3 and image.shape[2] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        ax.set_title(f"{labels[i]}: {names[labels[i]]}", fontsize=7)
    fig.tight_layout()
    tmp = temp_path(out)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _body(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_tools.inspect", description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path, help="a .h5 file written by data_tools.shard")
    p.add_argument("--grid", type=Path, metavar="OUT.png", help="also save a picture of sample images with labels")
    p.add_argument("--count", type=int, default=32, help="images in the grid (default 32)")
    p.add_argument("--seed", type=int, default=0, help="which samples go in the grid")
    args = p.parse_args(argv)
    if args.count < 1:
        raise DataError(f"--count must be at least 1, got {args.count}")
    if args.grid is not None:
        try:
            import matplotlib  # noqa: F401  (checked before any work: the grid is drawn last)
        except ImportError:
            raise DataError("--grid: drawing needs matplotlib, which is not installed; install the report extra "
                            "(pip install 'ddp_cnn[report]', or pip install matplotlib)") from None
    images, labels, _, attrs = h5format.read_rows(args.file)
    try:
        print(summarize(args.file, images, labels, attrs), flush=True)
    except BrokenPipeError:
        # The reader left (`| head`): what it took is all it wanted.  Later output, and the
        # interpreter's last flush, go to /dev/null instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.grid is not None:
        if not len(images):
            raise DataError(f"{args.file}: no images to draw")
        save_grid(args.grid, images, labels, attrs["class_names"], args.count, args.seed)
        print(f"grid: {args.grid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
