"""Atomic file writes: write a temporary file in the target's folder, flush it to disk, then
``os.replace`` it over the target. A run killed at any moment leaves either the old file or the
new one, never a truncated one (which ``--resume`` would otherwise trip over)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, IO


def atomic_write(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)
