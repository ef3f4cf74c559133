"""Fetching a known data set's four IDX files, each checked against its known sha256 before use.

``python -m data_tools.download fashion-mnist --cache DIR`` fetches only;
``python -m data_tools.shard --download NAME`` fetches and shards.  A file
already in the cache is reused when its hash is right, and fetched again
otherwise.  A download goes to a temporary name, is hashed, and is renamed
into the cache only when the hash matches: a cache never holds a bad file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from data_tools import idx
from data_tools.atomic import temp_path
from data_tools.datasets import KNOWN, KnownDataset
from data_tools.errors import DataError, run_cli

TIMEOUT_S = 60
BLOCK = 1 << 20


def default_cache(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddp_cnn" / name


def known(name: str) -> KnownDataset:
    if name not in KNOWN:
        raise DataError(f"--download {name}: unknown data set, expected one of {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def hash_ok(dataset: KnownDataset, role: str, path: Path) -> bool:
    """True when the file is the canonical one, or a re-compressed copy of the same IDX data."""
    blob = idx.read_bytes(path)
    if dataset.accepts(role, hashlib.sha256(blob).hexdigest()):
        return True
    try:
        raw = idx.decompress(path, blob)
    except DataError:
        return False
    return dataset.accepts(role, "", hashlib.sha256(raw).hexdigest())


def _stream_to(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        while block := response.read(BLOCK):
            out.write(block)


def fetch_file(dataset: KnownDataset, role: str, cache: Path, mirrors: Sequence[str]) -> Path:
    """The cached, hash-checked file for one role, downloading it if needed."""
    name = dataset.files[role].name
    final = cache / name
    if final.is_file() and hash_ok(dataset, role, final):
        return final
    problems = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        tmp = temp_path(final)
        try:
            _stream_to(url, tmp)
            if not hash_ok(dataset, role, tmp):
                problems.append(f"{url}: sha256 mismatch, expected {dataset.files[role].sha256}")
                continue
            os.replace(tmp, final)
            return final
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problems.append(f"{url}: {getattr(exc, 'reason', exc)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(f"cannot get {name}: " + "; ".join(problems))


def fetch(name: str, cache: Path | None = None, mirror: str | None = None) -> dict[str, Path]:
    """Role -> path of the four checked files of data set ``name`` in ``cache``."""
    dataset = known(name)
    cache = Path(cache) if cache is not None else default_cache(name)
    if cache.exists() and not cache.is_dir():
        raise DataError(f"--cache {cache}: exists and is not a folder")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--cache {cache}: cannot create folder ({exc.strerror})") from None
    mirrors = (mirror,) if mirror else dataset.mirrors
    return {role: fetch_file(dataset, role, cache, mirrors) for role in dataset.files}


def _body(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_tools.download", description=__doc__.split("\n")[0])
    parser.add_argument("name", help=f"one of {', '.join(sorted(KNOWN))}")
    parser.add_argument("--cache", type=Path, help="folder for the files (default ~/.cache/ddp_cnn/NAME)")
    parser.add_argument("--mirror", help="base URL to fetch from instead of the canonical mirrors")
    args = parser.parse_args(argv)
    for path in fetch(args.name, args.cache, args.mirror).values():
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
