"""Atomic file writes: write to a temporary file in the target's folder, then rename over the target.

A crash or an error mid-write leaves the previous file (or no file) in place, never a partial one.
`check_not_inputs` refuses, before anything is written, an output that would replace an input.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mednets.errors import InvalidInputError

__all__ = ["UMASK", "atomic_path", "atomic_write_bytes", "atomic_write_text", "check_not_inputs"]

UMASK = os.umask(0)  # the process's file-creation mask, read once (reading it means setting it)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed.

    The temporary name keeps `path`'s suffixes (e.g. `.nii.gz`) so writers that choose a format
    by extension still work.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o666 & ~UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_not_inputs(
    outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str] | None], option: str
) -> None:
    """Refuse outputs that are input files, or files inside an input folder, before anything is written.

    Args:
        outputs: the files a command would write.
        inputs: the files and folders it reads (None entries are skipped); a folder protects every
            file under it.
        option: the option the outputs come from, for the message (e.g. `--out`).

    Raises:
        InvalidInputError: naming the output and the input it would replace.
    """
    protected: dict[Path, Path] = {}
    for item in (Path(p) for p in inputs if p is not None):
        files = [f for f in item.rglob("*") if f.is_file()] if item.is_dir() else [item] if item.exists() else []
        protected.update({f.resolve(): f for f in files})
    for output in map(Path, outputs):
        replaced = protected.get(output.resolve())
        if replaced is not None:
            raise InvalidInputError("an output would replace an input; choose another output path",
                                    source=f"{option} {output}", got=f"input {replaced}")  # fmt: skip
