"""Atomic file and folder writes: an artefact is either the old one or the new one, never half."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emotune.errors import ConfigError

logger = logging.getLogger("emotune")

# Temporary folders are named .<target>.tmp-<host>-<pid>-<random> (and .<target>.old-... while the old
# artefact is moved aside), so that a later save can tell the leftovers of a killed process from the work
# of a live one.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


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


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (GGUF, torch.save); on
    success it replaces ``path`` in one step, on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write there ({exc.strerror}). Choose a writable output path.") from None
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process, or a platform that cannot tell: assume alive
    return True


def _stale_leftovers(target: Path) -> list[tuple[str, Path]]:
    """``(kind, folder)`` for each temporary folder beside ``target`` left by a dead process on this host."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-([0-9a-f]{{6}})-(\d+)-")
    found: list[tuple[str, Path]] = []
    if not target.parent.is_dir():
        return found
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match and match[2] == _HOST and int(match[3]) != os.getpid() and not _pid_alive(int(match[3])):
            found.append((match[1], path))
    return found


def recover(target: str | Path) -> None:
    """Tidy up after a process killed in the middle of ``atomic_dir(target)``.

    A target found missing while a dead process's moved-aside copy (``.old-``) exists is put back
    (that process was killed between its two renames); then the dead processes' temporary folders
    are removed. Folders of live processes are left alone.
    """
    target = Path(target)
    leftovers = _stale_leftovers(target)
    olds = sorted((p for kind, p in leftovers if kind == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
        logger.warning("%s: restored from the copy a killed save had moved aside.", target)
    for _, path in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file of ``root`` to disk before the rename that publishes it."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = True, marker: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` in one atomic step.

    If the body raises, ``target`` is untouched and the temporary folder is removed. After a kill,
    what remains is the old or the new ``target`` plus a dot-named temporary folder beside it, which
    the next save to the same target removes (``recover``).
    """
    target = Path(target)
    recover(target)
    check_output_dir(target, overwrite=overwrite, marker=marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{_HOST}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{tag}", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):
            old = tmp  # now holds the previous artefact
        else:
            # no atomic swap on this system: move the old one aside, then rename; recover() mends a kill between
            if target.exists():
                old = target.with_name(f".{target.name}.old-{tag}{secrets.token_hex(4)}")
                os.replace(target, old)
            os.replace(tmp, target)
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
