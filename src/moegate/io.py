"""Atomic writes: a killed job never leaves a file or directory that looks finished.

Every writer goes to a temporary sibling first and is renamed into place only when complete
(``os.replace`` is atomic on POSIX file systems, GPFS included, within one directory). A stage that
writes several files writes them into one temporary directory and swaps it in whole
(:func:`atomic_dir`), so its outputs are all new or all old, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 entries; outputs get the modes a plain open()/mkdir() would give,
# so a router directory stays readable by the RAG service that loads it
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; swap it in for ``path`` on success.

    A reader of ``path`` sees the old directory or the new one, whole. Where the kernel and file
    system can swap two entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs,
    tmpfs) ``path`` never goes missing. Elsewhere (NFS, GPFS, other systems) POSIX has no atomic way to
    replace a non-empty directory: the old one is renamed aside to ``.NAME.old``, the new one renamed
    in, and for the microseconds between ``path`` does not exist; :func:`wait_for_swap` lets a reader
    ride that out. A job killed there leaves ``.NAME.old`` (the previous version) and no ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _DIR_MODE)
        for sub in tmp.rglob("*"):
            os.chmod(sub, _DIR_MODE if sub.is_dir() else _FILE_MODE)
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            pass  # tmp now holds the old directory; removed below
        elif path.exists():
            old = _aside(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            shutil.rmtree(_aside(path), ignore_errors=True)  # left by a job killed mid-swap
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _aside(path: Path) -> Path:
    """Where :func:`atomic_dir` parks the old directory while it has no atomic exchange."""
    return path.with_name(f".{path.name}.old")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` in one step (both must exist). False where the C library,
    kernel or file system cannot; other failures raise OSError."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def wait_for_swap(path: str | os.PathLike, timeout: float = 2.0) -> None:
    """Return once ``path`` exists or no :func:`atomic_dir` swap of it is under way (``.NAME.old``
    present), at most ``timeout`` seconds: a reader's guard for the gap of the two-rename swap."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists() and _aside(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


@contextlib.contextmanager
def pinned_dir(path: str | os.PathLike) -> Iterator[Callable[[], bool]]:
    """Hold the directory ``path`` names now open and yield ``unchanged()``: whether ``path`` still
    names that same directory. If it does, every file read by path in between came from it, since
    :func:`atomic_dir` never swaps an old directory back in, and an open directory's inode number
    cannot be handed to a new one. (Without the hold, a swap that frees the old inode and a new save
    that reuses it would look unchanged.) Where ``path`` cannot be opened, ``unchanged()`` is True."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # missing (the reader's own check says so) or not openable as a directory here
        yield lambda: True
        return
    try:
        held = os.fstat(fd)

        def unchanged() -> bool:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return False
            return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

        yield unchanged
    finally:
        os.close(fd)


def read_text_csv(path: str | os.PathLike, columns: tuple[str, ...] | list[str], what: str, key: str,
                  error: type[Exception] = ValueError):
    """A user's CSV as a DataFrame of strings (no NaN: an empty cell is ""), header names stripped.

    ``what`` names the file in messages ("labelled CSV"), ``key`` the config key that points at it. A
    missing file, an unreadable one, or one without every name in ``columns`` raises ``error``
    naming the file and the key.
    """
    import pandas as pd

    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found ({key})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a readable CSV ({key}): {e}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in columns if c not in raw.columns]
    if missing:
        raise error(f"{path}: missing column(s) {missing}; expected a header with {list(columns)} "
                    f"(found {list(raw.columns)}; {key})")
    return raw


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def save_figure(path: str | os.PathLike, fig) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")


def read_table(path: str | os.PathLike, columns, missing_hint: str):
    """A stage's Parquet input as a DataFrame that has at least ``columns``.

    Errors name the file: FileNotFoundError "PATH: missing (MISSING_HINT)", ValueError for a file
    that is not Parquet or lacks a column.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({missing_hint})")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected at least {list(columns)}")
    return frame


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (did the stage that writes it run?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
