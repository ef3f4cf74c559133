"""``python -m ddp_cnn.predict --checkpoint PATH FILE...``: classify your own images with a trained model.

Prints the top classes (names from the checkpoint) with their probabilities,
one line per image.  Runs on the CPU in one process: no MPI.  ``--checkpoint``
takes a training checkpoint (.h5) or a .npz from ``python -m ddp_cnn.export``
(which needs neither h5py nor MPI).

What FILE may be (told apart by content, not by name):
- an image Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...; needs the
  ``images`` extra): EXIF rotation applied, transparency laid on white,
  converted to grayscale or RGB as the model was trained (said on stderr
  when the picture's colours differ from the model's), inverted when it
  is dark-on-light and the model learned light-on-dark (see --invert),
  scaled so it fits the model's input size (aspect ratio kept, Lanczos) and
  centred on black: what ``data_tools.shard --size`` does to training
  images.  An image of the input size is used pixel for pixel.
- a .npy array: uint8 pixels 0..255, or floats 0..1, of shape (H, W, C) for
  one image or (N, H, W, C) for N images, the model's H, W and C; a
  grayscale model also takes (H, W) and (N, H, W).  Arrays are taken as
  they are: no resizing.
Then x = (pixel/255 - mean)/std, per channel, with the training data's mean
and std stored in the checkpoint, exactly as during training.

--invert: Fashion-MNIST items are light on a black background; a photo of a
dark object on a light background must be inverted first.  ``auto`` inverts
an input whose border pixels are mostly light (more than half of them at or
above mid-grey), for a grayscale model whose training pixels were mostly
dark (mean below mid-grey) only: RGB photos and light training images are
never inverted by ``auto``.  ``yes`` / ``no`` force it.  This applies to .npy
arrays too (a Fashion-MNIST array has a black border, so auto leaves it alone).

A bad FILE gets one ``error: FILE: ...`` line on stderr and the others are
still classified; the exit code is then 2.  A bad checkpoint stops at once
with exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ddp_cnn.data.pixels import normalize
from ddp_cnn.data.shards import DataError
from ddp_cnn.dist.faults import EXIT_USAGE
from ddp_cnn.inference.models import load_model, pixel_stats_of, probabilities, top_k
from ddp_cnn.run.checkpoint import CheckpointError

NPY_MAGIC = b"\x93NUMPY"
PILLOW_HINT = "pip install 'ddp_cnn[images]' (or pip install pillow); .npy arrays work without it"


class InputError(ValueError):
    """One input file that cannot be classified; the message names it."""


# ---- reading inputs: each returns (N, H, W, C) pixels and the per-image inversion --------------

def mostly_light_border(image: np.ndarray) -> bool:
    """True when more than half of the outermost pixels (all channels) are at or above mid-grey."""
    mid = 128 if image.dtype == np.uint8 else 0.5
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return bool(np.mean(border >= mid) > 0.5)


def wants_invert(image: np.ndarray, invert: str, auto: bool = True) -> bool:
    """``auto``: whether --invert auto may invert at all for this model (see the module's doc)."""
    return invert == "yes" or (invert == "auto" and auto and mostly_light_border(image))


def read_npy(path: Path, shape: tuple, invert: str, auto: bool = True):
    """A .npy of uint8 0..255 or float 0..1 of the model's ``shape`` (H, W, C), one or (N, ...) many;
    (H, W) and (N, H, W) too when C is 1.  Returns (pixels (N, H, W, C), inverted flags, batched)."""
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(f"{path}: holds pickled Python objects; expected a numeric .npy array") from None
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    h, w, c = shape
    if c == 1 and a.ndim in (2, 3) and a.shape[-2:] == (h, w):
        a = a[..., None]  # grayscale without a channel axis
    batched = a.ndim == 4  # even with N == 1: its rows are labelled FILE[i]
    if a.shape == (h, w, c):
        a = a[None]
    if a.ndim != 4 or a.shape[1:] != (h, w, c) or a.shape[0] == 0:
        one, many = (f"({h}, {w}) or ", f"(N, {h}, {w}) or ") if c == 1 else ("", "")
        raise InputError(f"{path}: array of shape {a.shape}; expected {one}({h}, {w}, {c}) for one image, "
                         f"{many}(N, {h}, {w}, {c}) for N >= 1 images")
    if a.dtype == np.uint8:
        pass
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError(f"{path}: holds NaN or infinite values; expected floats in [0, 1]")
        if a.min() < 0 or a.max() > 1:
            raise InputError(f"{path}: float values from {a.min():g} to {a.max():g}; expected floats in [0, 1] "
                             "(divide 0..255 pixels by 255, or save them as uint8)")
        a = a.astype(np.float64)
    else:
        raise InputError(f"{path}: dtype {a.dtype}; expected uint8 pixels (0..255) or floats in [0, 1]")
    flags = [wants_invert(img, invert, auto) for img in a]
    if any(flags):
        a = a.copy()
        top = 255 if a.dtype == np.uint8 else 1.0
        for img, flip in zip(a, flags):
            if flip:
                img[...] = top - img
    return a, flags, batched


def read_image(path: Path, shape: tuple, invert: str, auto: bool = True):
    """An image file through Pillow, prepared as ``data_tools.shard`` prepares training images
    (:mod:`data_tools.images`) -> ((1, H, W, C) uint8, [inverted], False)."""
    try:
        from PIL import Image  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise InputError(f"{path}: reading images needs Pillow; {PILLOW_HINT}") from None
    from data_tools import images
    try:
        image = images.open_image(path)
        gray = images.is_gray(image)
        pixels = images.to_pixels(image, shape[2])
    except DataError as exc:
        message = str(exc)
        if "not an image Pillow can read" in message:
            message += " nor a .npy array"
        raise InputError(message) from None
    if gray != (shape[2] == 1):  # said, not silent: the model sees other colours than the file has
        said = ("a grayscale picture, converted to RGB (three equal channels) for a model of colour images"
                if gray else "a colour picture, converted to grayscale for a model of grayscale images")
        print(f"note: {path}: {said}", file=sys.stderr)
    flip = wants_invert(pixels, invert, auto)
    if flip:
        pixels = 255 - pixels
    return images.fit(pixels, shape[:2])[None], [flip], False


def read_input(path: Path, shape: tuple, invert: str, auto: bool = True):
    """(pixels (N, H, W, C), inverted flags, batched) for one FILE argument of a model taking ``shape``
    (H, W, C); InputError naming it.  ``auto``: whether --invert auto may invert (:func:`wants_invert`)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; expected an image file or a .npy array") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise InputError(f"{path}: empty file; expected an image file or a .npy array")
    if head == NPY_MAGIC:
        return read_npy(path, shape, invert, auto)
    if path.suffix.lower() == ".npy":
        raise InputError(f"{path}: not a .npy array (no NumPy header)")
    return read_image(path, shape, invert, auto)


# ---- the command ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m ddp_cnn.predict",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Classify your own images with a trained model.\n\n"
                                            + __doc__.split("\n", 2)[2].strip())
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (.h5) from ddp_cnn.train, or .npz from ddp_cnn.export")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files or .npy arrays")
    p.add_argument("--invert", default="auto", choices=["auto", "yes", "no"],
                   help="make dark-on-light inputs light-on-dark like the training data; auto: when the "
                        "border is mostly light, for grayscale models of dark images only (default: auto)")
    p.add_argument("--top", type=int, default=3, metavar="K", help="how many classes to show (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON array of results instead of text")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top: must be >= 1, got {args.top}")
    try:
        model, meta = load_model(args.checkpoint, device="cpu")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        mean, std = pixel_stats_of(meta, model, args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if len(model.input_shape) != 3:
        print(f"error: {args.checkpoint}: model input is {model.input_shape}, not images (H, W, C)", file=sys.stderr)
        return EXIT_USAGE
    shape = tuple(model.input_shape)
    auto = shape[2] == 1 and mean[0] < 0.5  # a grayscale model of light things on dark (MNIST-like)
    classes = model.output_shape[0]
    names = list(meta.get("class_names") or [])
    names += [str(i) for i in range(len(names), classes)]  # a checkpoint without (enough) names: indices

    items, flags, batches, failed = [], [], [], False
    for name in args.files:
        try:
            pixels, inverted, batched = read_input(Path(name), shape, args.invert, auto)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
            continue
        items += [(name, i) for i in range(len(pixels))] if batched else [(name, None)]
        flags += inverted
        batches.append(normalize(pixels, mean, std, model.backend.dtype))
    results = []
    if batches:
        probs = probabilities(model.predict(np.concatenate(batches)))
        for (name, i), flip, top in zip(items, flags, top_k(probs, min(args.top, classes))):
            results.append({"file": name, "item": i, "inverted": flip,
                            "top": [{"class": names[c], "index": c, "probability": p} for c, p in top]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            shown = ", ".join(f"{t['class']} {t['probability'] * 100:.1f}%" for t in r["top"])
            label = r["file"] if r["item"] is None else f"{r['file']}[{r['item']}]"
            print(f"{label}{' (inverted)' if r['inverted'] else ''}: {shown}")
    return EXIT_USAGE if failed else 0


if __name__ == "__main__":
    sys.exit(main())
