"""Atomic file and folder writes: an artefact is either the old one or the new one, never half."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emotune.errors import ConfigError


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_output_dir(target: str | Path, *, overwrite: bool = True, marker: str | None = None) -> None:
    """Raise before any work if ``target`` cannot be written as an output folder.

    ``marker`` names a file that identifies a folder as ours: when ``target`` exists and holds
    files but not the marker, we refuse to overwrite, so a typo in ``--out`` cannot delete data.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"{target}: exists and is not a folder. Choose another output path.")
        if not overwrite and any(target.iterdir()):
            raise ConfigError(f"{target}: already exists. Remove it or choose another output path.")
        if marker is not None and any(target.iterdir()) and not (target / marker).exists():
            raise ConfigError(
                f"{target}: exists and holds files that emotune did not write (no {marker}). "
                "Choose an empty or new output folder."
            )


@contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = True, marker: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` in one rename.

    If the body raises, ``target`` is untouched and the temporary folder is removed; after a
    kill, what remains is a dot-named temporary folder beside it, never a half-written target.
    """
    target = Path(target)
    check_output_dir(target, overwrite=overwrite, marker=marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
