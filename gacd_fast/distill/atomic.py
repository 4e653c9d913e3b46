"""Atomic file writes: write a temporary file in the target's folder, flush it to disk, then
``os.replace`` it over the target. A run killed at any moment leaves either the old file or the
new one, never a truncated one (which ``--resume`` would otherwise trip over). The file gets the
permissions a plain ``open()`` would give it (0666 less the umask), not mkstemp's 0600. A
temporary left by a killed write (``.<name>.XXXXXXXX.tmp``) is removed by the next run in that
folder (``runs.locked``) or the next :func:`~gacd_fast.distill.train.fit` with that state file."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, IO


def current_umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux), else set and
    restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise _naming(e, path) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not e.filename:
            raise _naming(e, path) from None
        raise


def _naming(e: OSError, path: str) -> OSError:
    """``e`` with ``path`` as its file (a full disk's fsync names none), same errno and subclass."""
    if e.filename or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)
