"""Helpers for tests that spawn torch.distributed ranks on loopback."""
import os
import socket
import sys
import traceback
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(body: Callable[..., None], *args) -> None:
    """Run ``body(*args)`` in a spawned rank, then leave with os._exit: torch's gloo process group
    can deadlock in its destructor at interpreter shutdown, which would hang the test run instead
    of ending it. A failure prints its traceback and exits 1 (torch.multiprocessing reports it)."""
    try:
        body(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
