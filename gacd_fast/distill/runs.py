"""What keeps a run's output folder safe and a resume honest.

- :class:`RunError`: a user-facing error of a run (a bad ``--out`` or ``--device``, a folder in use
  by another run, an unreadable or foreign checkpoint, a teacher of another task): one line that
  names the file or option and says what to do. The CLI prints it and exits with 1.
- :func:`locked`: an exclusive lock on ``<out>/.gacd-fast.lock`` for the duration of a subcommand, so
  that two runs never write into one folder at once (re-entrant within a process: the demo's
  teacher and students share its folder). Taking it also removes the hidden temporary files that
  an interrupted atomic write left there (the folder is ours, so no other writer owns them).
- :func:`file_sha256`: a checkpoint's content hash; a student records its teacher's, and
  ``--resume`` refuses a different teacher.
- :func:`read_torch_file`: ``torch.load(weights_only=True)`` of a checkpoint or state file whose
  every failure (empty, truncated, corrupt, not a dict, not ours) is one line naming the file.
- :func:`check_teacher_fits`: the teacher was trained on this run's dataset (classes, channels).
- :func:`resolve_device`: ``--device`` names a device that exists here.

Imports nothing from the pipeline, so any of its modules may use it.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import pickle
import re
import socket
import threading
import time
import zipfile
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

LOCK_NAME = ".gacd-fast.lock"
# atomic.py's temporaries: "." + the target's name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

F = TypeVar("F", bound=Callable[..., Any])


class RunError(ValueError):
    """A run cannot go on for a reason the user can fix; the message is one line that names the
    file or option at fault and what to do."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or inf: the run stops before anything of it is saved."""


# -- the run folder --------------------------------------------------------------------------

def make_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` (and its parents), or say in one line why it cannot be the output folder."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunError(f"--out {out_dir} is a file, not a folder: choose another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out_dir}: cannot create the output folder ({os_reason(e)}): "
                       "choose another --out") from None


def os_reason(e: OSError) -> str:
    """An OSError as 'strerror' (plus the path when it is not the obvious one)."""
    text = e.strerror or type(e).__name__
    if e.errno == errno.ENOSPC:
        text += "; free some space"
    return text


_held: dict[str, list[Any]] = {}  # real path of a locked folder -> [open lock file, depth, owning thread]


def _lock_file(out_dir: str):
    """Open (create) the folder's lock file, with one-line errors for folders we cannot write."""
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        return open(path, "a+")
    except OSError as e:
        raise RunError(f"--out {out_dir} is not writable ({os_reason(e)}): choose another --out") from None


def _holder(f) -> str:
    try:
        f.seek(0)
        text = f.read().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def locked(out_dir: str, command: str = "", *, enabled: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of the run folder ``out_dir`` (created if missing) inside the block.

    A second run on the same folder, in another process, fails at once with a RunError that names
    the holder; within one process the lock is re-entrant. On entry, temporary files that an
    interrupted atomic write left in the folder are removed (nobody else can be writing there).
    ``enabled=False`` (ranks other than 0 under torchrun, which write nothing): no lock. Where the
    platform has no ``fcntl`` (Windows) the folder is not locked.
    """
    if not enabled:
        yield
        return
    make_out_dir(out_dir)
    key = os.path.realpath(out_dir)
    if key in _held:
        if _held[key][2] != threading.get_ident():
            raise RunError(f"--out {out_dir} is in use by another gacd-fast run (another thread of this process): "
                           "wait for it to finish or choose another --out")
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows)
        yield
        return
    f = _lock_file(out_dir)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(f)
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunError(f"--out {out_dir} is in use by another gacd-fast run ({holder}): wait for it to "
                           "finish or choose another --out") from None
        raise RunError(f"--out {out_dir}: cannot lock the folder ({os_reason(e)})") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, {command or 'gacd-fast'}, "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError:
        pass  # the lock holds even when its note cannot be written
    _held[key] = [f, 1, threading.get_ident()]
    try:
        remove_stale_temporaries(out_dir)
        yield
    finally:
        _held.pop(key, None)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()


def locking(out_dir_of: Callable[..., str], command: str, *, enabled: Callable[[], bool] = lambda: True) -> Callable[[F], F]:
    """Decorator: run the function under :func:`locked` on the folder ``out_dir_of(*args)`` names."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with locked(out_dir_of(*args, **kwargs), command, enabled=enabled()):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def remove_stale_temporaries(folder: str, target: str | None = None) -> list[str]:
    """Remove the hidden ``.<name>.XXXXXXXX.tmp`` files that interrupted atomic writes left in
    ``folder`` (only those of ``target``'s name when given); returns the removed paths. Call it only
    where no other process can be writing (inside :func:`locked`, or for a run's own state file)."""
    removed = []
    prefix = f".{os.path.basename(target)}." if target else None
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not _TEMP_RE.match(name) or (prefix is not None and not name.startswith(prefix)):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path):
                os.remove(path)
                removed.append(path)
        except OSError:
            pass
    return removed


# -- files -----------------------------------------------------------------------------------

def file_sha256(path: str) -> str:
    """The hex SHA-256 of the file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_failure(e: BaseException) -> str:
    """Why torch.load failed, in our words (torch's own text may suggest weights_only=False, which is
    unsafe advice for a file of unknown origin)."""
    if isinstance(e, EOFError) or (isinstance(e, RuntimeError) and "unexpected EOF" in str(e)):
        return "the file is empty or truncated"
    if isinstance(e, (RuntimeError, zipfile.BadZipFile)) and ("zip" in str(e).lower() or "stream" in str(e).lower()):
        return "not a torch file, or a truncated one"
    if isinstance(e, pickle.UnpicklingError):
        return "not a gacd-fast file (it holds objects a weights-only load refuses, or is corrupt)"
    if isinstance(e, (KeyError, ValueError, IndexError, TypeError, AttributeError, UnicodeDecodeError)):
        return "corrupt or not a torch file"
    if isinstance(e, OSError):
        return os_reason(e)
    return f"unreadable ({type(e).__name__})"


def read_torch_file(path: str, what: str, hint: str, *, required: Sequence[str] = (),
                    mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a dict holding at least ``required`` keys; any
    failure is a RunError "<path> is not a readable <what> (<why>); <hint>". FileNotFoundError
    passes through (callers say which file is missing)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any failure of an untrusted file is one line
        if mmap:  # an old-format (non-zip) file cannot be memory-mapped: read it whole
            return read_torch_file(path, what, hint, required=required)
        raise RunError(f"{path} is not a readable {what} ({_load_failure(e)}); {hint}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} is not a {what} (it holds a {type(obj).__name__}, not a dict); {hint}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise RunError(f"{path} is not a complete {what} (no {', '.join(map(repr, missing))}); {hint}")
    return obj


# -- the teacher and the device --------------------------------------------------------------

def check_teacher_fits(path: str, meta: dict[str, Any] | None, dataset: str, num_classes: int, channels: int, *,
                       option: str = "--teacher", same_dataset: bool = True) -> None:
    """RunError unless the model checkpoint ``path`` (its metadata ``meta``), given as ``option``, was
    trained with ``num_classes`` classes of ``channels``-channel images, on ``dataset`` itself when
    ``same_dataset`` (a teacher; evaluation may score a model on another dataset of the same shape)."""
    if not meta:
        return
    t_config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    t_data = t_config.get("dataset")
    t_classes, t_channels = meta.get("num_classes"), meta.get("in_channels")
    if (same_dataset and t_data is not None and t_data != dataset) or (
            t_classes is not None and t_classes != num_classes) or (t_channels is not None and t_channels != channels):
        what = "teacher" if option == "--teacher" else "model"
        raise RunError(f"{option} {path} was trained on {t_data or 'another dataset'} ({t_classes} classes, "
                       f"{t_channels} channels); this run is {dataset} ({num_classes} classes, {channels} channels): "
                       f"pass a {what} trained on {dataset}")


def resolve_device(name: str) -> torch.device:
    """The torch device ``--device name`` means here ("auto": cuda when available, else cpu), or a
    RunError saying why it cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise RunError(f"--device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "meta":
        raise RunError("--device meta holds no data, so nothing can be trained or evaluated on it: use auto, cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                           f"CUDA {torch.version.cuda or 'none'}): use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RunError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise RunError(f"--device {name}: {dev.type} is not available in this torch build: use auto, cpu or cuda")
    return dev
