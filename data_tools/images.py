"""Your own labelled images as arrays: a folder of class subfolders, or an .npz of ``images`` and ``labels``.

Both give uint8 pixels (N, H, W, C), C = 1 (grayscale) or 3 (RGB), int64
labels and the class names.  Images pass through Pillow: EXIF rotation
applied, transparency laid on white, 16-bit scaled to 8, then converted to
grayscale or RGB and, with a size, fitted into it with the aspect ratio kept
and centred on black (:func:`fit`).  ``ddp_cnn.predict`` prepares a user's
image with these same functions, so a model sees at prediction what it saw
in training.  Any bad input raises :class:`DataError` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from data_tools.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes without colour
MAX_CLASSES = 256  # labels are stored as uint8
PILLOW_HINT = "pip install 'ddp_cnn[images]' (or pip install pillow)"


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError(f"reading images needs Pillow: {PILLOW_HINT}") from None
    return Image, ImageOps


MAX_SIDE = 4096  # pixels: a side beyond this is a typo (every image becomes H x W x C bytes in memory)


def parse_size(text: str) -> tuple[int, int]:
    """'32x32' -> (32, 32) (height x width); DataError unless two integers in 1..MAX_SIDE."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and 0 < int(p) <= MAX_SIDE for p in parts):
        raise DataError(f"--size {text}: expected HEIGHTxWIDTH in pixels, each 1..{MAX_SIDE}, e.g. 32x32")
    return int(parts[0]), int(parts[1])


# ---------------------------------------------------------------- one image

def open_image(path, data: bytes | None = None):
    """A loaded Pillow image, upright (EXIF), from ``path`` or its bytes; DataError naming the file."""
    Image, ImageOps = _pil()
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, truncated data (OSError), decoder errors
        if type(exc).__name__ == "UnidentifiedImageError":
            raise DataError(f"{path}: not an image Pillow can read (PNG, JPEG, ...)") from None
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def is_gray(img) -> bool:
    return img.mode in GRAY_MODES


def to_pixels(img, channels: int) -> np.ndarray:
    """(h, w, channels) uint8 of a Pillow image: transparency on white paper, 16-bit scaled, 1 or 3 channels."""
    Image, _ = _pil()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit or float grayscale
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return a.reshape(*a.shape[:2], channels)


def fit(pixels: np.ndarray, hw: tuple) -> np.ndarray:
    """(h, w, C) uint8 scaled to fit (H, W) with its aspect ratio kept (Lanczos), centred on black.

    Letterboxing rather than cropping or stretching: nothing of the image is
    lost or distorted, and MNIST-style data already has a black background.
    An image of exactly (H, W) is returned pixel for pixel."""
    Image, _ = _pil()
    h, w = hw
    ih, iw, c = pixels.shape
    if (ih, iw) == (h, w):
        return pixels
    scale = min(h / ih, w / iw)
    nh, nw = max(1, round(ih * scale)), max(1, round(iw * scale))
    src = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    small = np.asarray(src.resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.uint8).reshape(nh, nw, c)
    canvas = np.zeros((h, w, c), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    return canvas


# ---------------------------------------------------------------- a folder of class subfolders

def list_folder(folder: Path) -> tuple[list[str], list[list[Path]]]:
    """(class names, image paths per class): subfolders in sorted order, their image files (any depth) sorted.

    Hidden files and folders are skipped, and so are files whose suffix is
    not an image's (a README.txt beside the pictures is no error)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--from-folder {folder}: no such folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"--from-folder {folder}: {len(classes)} class subfolders; expected one subfolder per "
                        "class, at least 2 (e.g. cats/ and dogs/)")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"--from-folder {folder}: {len(classes)} class subfolders, at most {MAX_CLASSES}")
    files = []
    for c in classes:
        found = sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(c).parts))
        if not found:
            raise DataError(f"{c}: class folder with no images ({', '.join(IMAGE_SUFFIXES)})")
        files.append(found)
    return [c.name for c in classes], files


class LazyImages:
    """Images read only when rows are asked for: ``images[rows]`` -> uint8 (k, H, W, C).

    ``read(sorted rows)`` gives the pixels of those rows; each request reads
    what it needs and keeps nothing, so a set far larger than memory is
    sharded a block at a time."""

    def __init__(self, shape: tuple, read):
        self.shape, self._read = tuple(shape), read

    dtype = np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, np.int64)
        if rows.ndim == 0:
            return self[rows[None]][0]
        wanted, back = np.unique(rows, return_inverse=True)  # read in file order, once each
        if not len(wanted):
            return np.zeros((0,) + self.shape[1:], np.uint8)
        return self._read(wanted)[back.reshape(-1)]


class Picked:
    """Rows ``rows`` of ``images`` (an array or :class:`LazyImages`) in that order, read by slices on demand."""

    def __init__(self, images, rows: np.ndarray):
        self.images, self.rows = images, np.asarray(rows)
        self.shape = (len(self.rows),) + tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part):
        picked = self.rows[part]
        if isinstance(self.images, np.ndarray):
            return self.images[picked]
        return self.images[picked]


def _header(path: Path, data: bytes):
    """(mode, (width, height) as the image stands upright) from the file's header, without decoding it."""
    Image, _ = _pil()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
            return img.mode, (height, width) if turned else (width, height)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large ({exc})") from None
    except Exception as exc:
        if type(exc).__name__ == "UnidentifiedImageError":
            raise DataError(f"{path}: not an image Pillow can read (PNG, JPEG, ...)") from None
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def read_folder(folder: Path, size: tuple | None, channels: int | None, progress=None):
    """(images :class:`LazyImages` (N, H, W, C), labels int64, class names, {name: sha256}) of a folder of
    class subfolders; the pixels are decoded when the rows are read.

    ``channels`` None: 3 unless every image is grayscale.  Without ``size``
    every image must have the first one's size.  One pass reads each file's
    header and bytes (for the hash), not its pixels.  The sha256 stands for the
    whole folder: a hash of the sorted "sha256  relative/path" lines, one per
    image (an attribute per file would not fit the HDF5 header)."""
    folder = Path(folder)
    names, files = list_folder(folder)
    paths, labels, lines, all_gray, first = [], [], [], True, None
    for label, group in enumerate(files):
        for path in group:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror})") from None
            mode, wh = _header(path, data)
            first = first or (path, wh)
            if size is None and wh != first[1]:
                raise DataError(f"{path}: {wh[1]}x{wh[0]} pixels but {first[0]} is "
                                f"{first[1][1]}x{first[1][0]}; give --size HxW to fit every image into one size")
            all_gray &= mode in GRAY_MODES
            paths.append(path)
            labels.append(label)
            lines.append(f"{hashlib.sha256(data).hexdigest()}  {path.relative_to(folder).as_posix()}\n")
            if progress is not None:
                progress(1)
    channels = channels or (1 if all_gray else 3)
    hw = size or (first[1][1], first[1][0])

    def read(rows):
        out = np.empty((len(rows), *hw, channels), np.uint8)
        for i, row in enumerate(rows):
            pixels = to_pixels(open_image(paths[row]), channels)
            out[i] = fit(pixels, size) if size else pixels
        return out
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    return (LazyImages((len(paths), *hw, channels), read), np.asarray(labels, np.int64), names,
            {f"{folder.name}/ ({len(lines)} images)": digest})


# ---------------------------------------------------------------- an .npz of images and labels

NPZ_MEMBERS = ("images", "labels", "class_names")


def _npy_location(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(offset, shape, fortran, dtype) of a stored (uncompressed) .npy member's array inside the .npz."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"no local header for {info.filename}")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        fh.seek(start)
        shape, fortran, dtype = _npy_header(fh)
        return fh.tell(), shape, fortran, dtype


def _npy_header(fh):
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy format version {version}")
    return read(fh, max_header_size=100_000) if version == (2, 0) else read(fh)


def _read_rows(source: Path, offset: int, shape: tuple, fortran: bool, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted) of an .npy array that starts at ``offset`` of ``source``.

    C-ordered arrays are read with one ``pread`` per run of consecutive rows: a
    memory map would be lighter to write but maps whole blocks of pages around
    every row it touches, so a random selection of rows made the process
    hold most of the file.  Fortran order (rare) goes through a map, unmapped
    after each call."""
    if fortran:
        mapped = np.memmap(source, np.uint8, "r", offset, shape, order="F")
        try:
            return np.ascontiguousarray(mapped[rows])
        finally:
            del mapped
    row_bytes = int(np.prod(shape[1:]))
    out = np.empty((len(rows),) + tuple(shape[1:]), np.uint8)
    flat = out.reshape(len(rows), row_bytes)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(source, "rb") as fh:
        fd, done = fh.fileno(), 0
        for run in np.split(rows, breaks):
            want = len(run) * row_bytes
            data = os.pread(fd, want, offset + int(run[0]) * row_bytes)
            if len(data) != want:
                raise ValueError(f"rows {run[0]}:{run[-1] + 1} lie beyond the end of the file")
            flat[done:done + len(run)] = np.frombuffer(data, np.uint8).reshape(len(run), row_bytes)
            done += len(run)
    return out


def _extracted(z: zipfile.ZipFile, member: str, scratch: Path) -> Path:
    """A compressed member inflated to a file in ``scratch`` a block at a time (memory: one block)."""
    import shutil
    out = Path(scratch) / member
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 * 2**20)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_npz(path: Path, size: tuple | None, channels: int | None, scratch: Path | None = None):
    """(images :class:`LazyImages` (N, H, W, C), labels int64, class names, {name: sha256}) of an .npz.

    It holds ``images`` uint8 (N, H, W) or (N, H, W, C) with C 1 or 3, and
    ``labels`` integers 0..K-1 (N,); optionally ``class_names`` (K strings),
    else the names are "0".."K-1".  ``size``/``channels`` convert through
    Pillow as for a folder; without them the pixels are taken as they are.
    The images are read in place where ``numpy.savez`` stored them
    uncompressed (the .npy member's rows at their offset in the archive); a
    compressed member (``savez_compressed``) is first inflated into
    ``scratch`` (a folder on disk) a block at a time.  Only the rows asked for
    are read, so memory does not grow with the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--from-npz {path}: no such file")
    if not zipfile.is_zipfile(path):  # else np.load would speak of pickles
        raise DataError(f"{path}: not an .npz archive (numpy.savez writes one)")
    try:
        with zipfile.ZipFile(path) as z:
            members = {Path(n).stem: n for n in z.namelist() if n.endswith(".npy")}
            missing = [k for k in ("images", "labels") if k not in members]
            if missing:
                raise DataError(f"{path}: no '{missing[0]}' array; expected 'images' (N, H, W[, C]) uint8 and "
                                f"'labels' (N,) integers (has {', '.join(members) or 'nothing'})")
            with z.open(members["labels"]) as fh:
                labels = np.lib.format.read_array(fh, allow_pickle=False)
            names = None
            if "class_names" in members:
                with z.open(members["class_names"]) as fh:
                    names = np.lib.format.read_array(fh, allow_pickle=False)
            info = z.getinfo(members["images"])
            if info.compress_type == zipfile.ZIP_STORED:
                source, (offset, shape, fortran, dtype) = path, _npy_location(path, z, info)
            else:
                if scratch is None:
                    raise DataError(f"{path}: its images are compressed; a scratch folder is needed to inflate them")
                source = _extracted(z, members["images"], scratch)
                with open(source, "rb") as fh:
                    shape, fortran, dtype = _npy_header(fh)
                    offset = fh.tell()
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise DataError(f"{path}: 'images' is {dtype} {shape}; expected uint8 (N, H, W) or "
                        "(N, H, W, C) with C 1 or 3")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{path}: 'class_names' is {names.dtype} {names.shape}; expected strings of shape (K,)")
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise DataError(f"{path}: 'class_names' repeats a name ({sorted(n for n in names if names.count(n) > 1)[0]!r})")
    stored = tuple(shape) + ((1,) if len(shape) == 3 else ())
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' is {labels.dtype} {labels.shape}; expected integers of shape (N,)")
    if len(labels) != stored[0]:
        raise DataError(f"{path}: {stored[0]} images but {len(labels)} labels")
    if not len(labels):
        raise DataError(f"{path}: no images")
    labels = labels.astype(np.int64)
    k = len(names) if names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= k or k > MAX_CLASSES:
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise DataError(f"{path}: label {bad} out of range; expected 0..{k - 1}"
                        + (f" (one per class name, {k} names)" if names is not None else "")
                        + (f", at most {MAX_CLASSES} classes" if k > MAX_CLASSES else ""))
    empty = sorted(set(range(k)) - set(np.unique(labels).tolist()))
    if empty:  # as a class folder without images: a class the model could never learn
        raise DataError(f"{path}: no images of class{'es' if len(empty) > 1 else ''} "
                        f"{', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''} of 0..{k - 1}; "
                        "number the labels 0..K-1 without gaps" + (", or drop those class names" if names else ""))
    want = channels or stored[3]
    hw = size or stored[1:3]
    convert = size is not None or want != stored[3]

    def read(rows):
        try:
            pixels = _read_rows(source, offset, stored, fortran, rows)
        except (OSError, ValueError) as exc:  # a file cut short
            raise DataError(f"{path}: cannot read images ({exc})") from None
        if not convert:
            return pixels
        Image, _ = _pil()
        return np.stack([fit(to_pixels(Image.fromarray(im[..., 0] if im.shape[2] == 1 else im), want), hw)
                         for im in pixels])
    return (LazyImages((len(labels), *hw, want), read), labels, names or [str(i) for i in range(k)],
            {path.name: file_sha256(path)})
