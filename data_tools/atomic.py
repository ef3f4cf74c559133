"""All-or-nothing output: every file is written under a temporary name and renamed when all are done.

A sharding run writes several files that only make sense together (shards of
one permutation, a test file, a manifest). Publishing them one by one would
leave a mixed folder after a crash or Ctrl-C, and the trainer would then train
on shards of two different runs. So files are first written as
``<name>.tmp-<pid>`` beside their final place (same filesystem, so the rename
is atomic), fsynced, and renamed together only after the last one is complete.
On any exception, KeyboardInterrupt included, everything this run created is
removed and the folder is as it was.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from data_tools.errors import DataError


def temp_path(final: Path) -> Path:
    """The temporary sibling of ``final`` owned by this process."""
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make renames durable; some filesystems refuse to fsync a directory, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_folder(folder: Path, existing: Iterable[Path], *, force: bool) -> None:
    """Refuse an output folder that is a file, or that holds outputs already (unless force)."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--out {folder}: exists and is not a folder")
    found = sorted(p.name for p in existing)
    if found and not force:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise DataError(f"--out {folder}: already holds {shown}; use --force to replace")


class AtomicOutput:
    """Context manager: write files via :meth:`temp` and publish them all on a clean exit.

    ``replaces`` are existing files that the new set supersedes (with --force);
    they are removed after the new files are in place, so the folder never holds
    a mix of two runs.  Files are published in the order they were first asked
    for, so write the manifest last.
    """

    def __init__(self, folder: Path, replaces: Iterable[Path] = ()):
        self.folder = Path(folder)
        self.replaces = list(replaces)
        self._temps: dict[str, Path] = {}
        self._created_folder = False

    def temp(self, name: str) -> Path:
        """Where to write the file that will be published as ``folder/name``."""
        path = temp_path(self.folder / name)
        self._temps[name] = path
        return path

    def __enter__(self) -> "AtomicOutput":
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
            except OSError as exc:
                raise DataError(f"--out {self.folder}: cannot create folder ({exc.strerror})") from exc
            self._created_folder = True
        elif not self.folder.is_dir():
            raise DataError(f"--out {self.folder}: exists and is not a folder")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._publish()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _publish(self) -> None:
        for path in self._temps.values():
            fsync_file(path)
        done = []
        try:
            for name, path in self._temps.items():
                os.replace(path, self.folder / name)
                done.append(self.folder / name)
        except BaseException:
            # A failure between renames must not leave half a set in place.
            for final in done:
                final.unlink(missing_ok=True)
            raise
        new = {self.folder / name for name in self._temps}
        for old in self.replaces:
            if old not in new:
                old.unlink(missing_ok=True)
        fsync_dir(self.folder)

    def _discard(self) -> None:
        for path in self._temps.values():
            path.unlink(missing_ok=True)
        if self._created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass  # not empty: someone else wrote there meanwhile; leave their files alone
