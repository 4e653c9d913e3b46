"""A backend's per-op functions, built from the ops' contracts (``contract.Op``) and the backend's
float64 policy, so that no backend writes an op's argument list again.

Every entry takes the reference's positional arguments, in its order, and returns what the
reference returns (see each op's module). A compiled entry runs the op's forward operator in the
backend's namespace through ``Op.call``; the calls its kernels do not take (float64 inputs on a
backend whose kernels compute in float32, and whatever ``Op.compiled_when`` refuses) run the torch
backend's implementation instead: that policy is declared here, never in a kernel.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from .._precision import no_autocast
from .contract import CompiledOp, Op
from .reference import OPS


def torch_entry(op: Op) -> Callable[..., Any]:
    """The torch backend's function for ``op``: its ``torch`` implementation, else its reference, run
    with the enclosing autocast off. An op computes in its inputs' dtypes on every backend: the
    compiled kernels ignore autocast, and so must the torch code (else an fp32 bank under a bf16
    region would be multiplied in bf16 by this backend alone)."""
    fn = op.torch or op.reference

    @functools.wraps(fn)
    def entry(*args: Any) -> Any:
        with no_autocast(args[0].device):
            return fn(*args)

    return entry


def torch_entries() -> dict[str, Callable[..., Any]]:
    """Entry name -> function, for every op: the torch backend."""
    return {op.entry: torch_entry(op) for op in OPS}


def _compiled_entry(op: Op, namespace: str, native_float64: bool,
                    before: Optional[Callable[[], None]]) -> Callable[..., Any]:
    forward, fallback = op.compiled[0], torch_entry(op)
    call = op.call or (lambda fn, *args: fn(*args))

    def entry(*args: Any) -> Any:
        if (not native_float64 and args[0].dtype == torch.float64) or (
                op.compiled_when is not None and not op.compiled_when(*args)):
            return fallback(*args)
        if before is not None:
            before()
        return call(forward.resolve(namespace), *args)

    # the reference's signature and docstring (help(), inspect.signature), under the entry's name
    functools.update_wrapper(entry, op.reference)
    entry.__name__ = entry.__qualname__ = op.entry
    return entry


def compiled_entries(backend: str, namespace: str, *, native_float64: bool,
                     before: Optional[Callable[[], None]] = None) -> dict[str, Callable[..., Any]]:
    """Entry name -> function for compiled backend ``backend`` (ops in ``namespace``).

    An op with kernels in ``backend`` (``Op.compiled_in``) runs them; float64 inputs run the torch
    implementation unless ``native_float64``; ``before()`` runs first on the kernels' path (the
    extension loads its library there). An op without kernels here runs the torch implementation
    when ``Op.torch_elsewhere``, else the backend leaves it out.
    """
    out: dict[str, Callable[..., Any]] = {}
    for op in OPS:
        if backend in op.compiled_in:
            out[op.entry] = _compiled_entry(op, namespace, native_float64, before)
        elif op.torch_elsewhere:
            out[op.entry] = torch_entry(op)
    return out


def define_compiled(backend: str, namespace: str) -> list[tuple[str, CompiledOp]]:
    """Define in ``namespace`` every compiled operator ``backend`` has kernels for; returns them
    with the name of their op (``[(op name, CompiledOp)]``), for the backend to register its kernels."""
    defined = []
    for op in OPS:
        if backend in op.compiled_in:
            for compiled in op.compiled:
                compiled.define(namespace)
                defined.append((op.name, compiled))
    return defined
