"""``python -m ddp_cnn.export --checkpoint PATH --out model.npz``: a trained model in one portable file.

The .npz holds ``params`` (the flat parameter buffer, in the checkpoint's
dtype), ``buffers/<name>`` (BatchNorm running statistics) and ``meta``, a
JSON string: format marker and version, the model description, class names,
the pixel mean and std of the training data (one per channel), where it came from, and a
sha256 of the parameters.  ``ddp_cnn.inference.load(path)`` rebuilds the
model from it with NumPy alone (no h5py, no MPI, no pickle); the optimizer
state stays behind, so the file is about half a checkpoint.

The file is written as ``<out>.tmp-<pid>``, fsynced and renamed into place,
so a crash leaves either no file or a complete one.  An existing ``--out``
is kept unless ``--force``.  Exit 2 with one ``error:`` line on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from data_tools.atomic import fsync_dir, temp_path

from ddp_cnn.dist.faults import EXIT_USAGE
from ddp_cnn.inference.models import NPZ_FORMAT, NPZ_VERSION, load_model, pixel_stats_of
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.system.backend import to_host


class ExportError(ValueError):
    """Bad input or output path; the message names the file."""


def npz_contents(model, meta: dict, source: str) -> dict:
    """The arrays of the .npz for a loaded model and its checkpoint meta."""
    mean, std = pixel_stats_of(meta, model, source)
    params = to_host(model.params)
    classes = model.output_shape[0]
    out_meta = {
        "format": NPZ_FORMAT, "format_version": NPZ_VERSION,
        "model": model.describe(),
        "class_names": list(meta.get("class_names") or [str(i) for i in range(classes)]),
        "mean": mean.tolist(), "std": std.tolist(),
        "source": {"checkpoint": Path(source).name,
                   **{k: meta[k] for k in ("global_step", "epoch", "world_size", "sharding_id") if k in meta}},
        "params_sha256": ckpt.params_digest(params),
    }
    arrays = {"params": params, "meta": np.array(json.dumps(out_meta))}
    arrays.update({f"buffers/{name}": to_host(buf) for name, buf in model.named_buffers().items()})
    return arrays


def write_atomic(out: Path, arrays: dict, force: bool) -> None:
    """np.savez to a temporary sibling, fsync, then rename (no-clobber unless force)."""
    tmp = temp_path(out)
    try:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a bare name
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if `out` appeared meanwhile: never clobbers
            except FileExistsError:
                raise ExportError(f"{out}: already exists; use --force to replace it") from None
            except OSError:  # a filesystem without hard links
                if out.exists():
                    raise ExportError(f"{out}: already exists; use --force to replace it") from None
                os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def check_out(out: Path, force: bool) -> None:
    """Refuse before any work: an existing file (without force), a folder, a missing parent folder."""
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; expected the path of the .npz file to write")
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists; use --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{out}: folder {parent} does not exist")


def export(checkpoint, out, force: bool = False) -> Path:
    """Write the model of `checkpoint` (.h5, or an .npz to copy) to `out`; returns `out`."""
    out = Path(out)
    check_out(out, force)
    model, meta = load_model(checkpoint, device="cpu")
    write_atomic(out, npz_contents(model, meta, str(checkpoint)), force)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m ddp_cnn.export",
                                description="Write a trained model (architecture, weights, class names, "
                                            "normalisation) to a portable .npz that needs only NumPy to load.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.h5) written by ddp_cnn.train")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.force)
    except (ExportError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the output folder is read-only, the disk is full, ...
        print(f"error: {args.out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_USAGE
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB); load it with ddp_cnn.inference.load({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
