"""What the compiled backends share for an op: its schema, its fake (shape) rules, its autograd formula.

A compiled backend (``triton``, ``cext``) runs an op as ``torch.ops.<namespace>.<name>``. Each op's
module (``info_nce.py``, ``l2_normalize.py``, ...) declares its compiled ops once as
:class:`CompiledOp` values; a backend calls :meth:`CompiledOp.define` for its namespace and then
registers only its kernels (Python launchers for Triton, ``TORCH_LIBRARY_IMPL`` in csrc/ for the
extension). The backends therefore cannot disagree on a schema, a fake or a gradient formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch

_defined: set[str] = set()


@dataclass(frozen=True)
class CompiledOp:
    """One operator of a compiled backend.

    name: the operator's name in every namespace. schema: its signature without the name, in
    torch's schema language. fake: the meta kernel (checks shapes and dtypes with ``torch._check``
    and returns empty outputs). backward/setup_context: the autograd formula, or None for an op
    that is not differentiated (backward ops, the in-place PGD step); ``backward`` takes the
    namespace first, so the formula calls that namespace's backward op.
    """

    name: str
    schema: str
    fake: Callable[..., Any]
    backward: Optional[Callable[..., Any]] = None
    setup_context: Optional[Callable[..., None]] = None

    def qualname(self, namespace: str) -> str:
        return f"{namespace}::{self.name}"

    def define(self, namespace: str) -> None:
        """Define the op in ``namespace`` with its fake and autograd formula (once per process)."""
        qualname = self.qualname(namespace)
        if qualname in _defined:
            return
        torch.library.define(qualname, self.schema)
        torch.library.register_fake(qualname, self.fake)
        if self.backward is not None:
            torch.library.register_autograd(
                qualname, partial(self.backward, namespace), setup_context=self.setup_context
            )
        _defined.add(qualname)

    def resolve(self, namespace: str) -> Callable[..., Any]:
        """The callable ``torch.ops.<namespace>.<name>``."""
        return getattr(getattr(torch.ops, namespace), self.name)


def first_order_only(message: str) -> None:
    """Refuse a backward run with grad mode on (``create_graph=True``): the backward ops have no
    autograd formula of their own, so differentiating them again would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(message)


def check_rows(name: str, x: torch.Tensor) -> None:
    """Fake-kernel check: a floating [N, D] tensor."""
    torch._check(x.dim() == 2, lambda: f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    torch._check(x.is_floating_point(), lambda: f"{name} must be a floating tensor, got {x.dtype}")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Fake-kernel check: ``x`` has ``ref``'s shape and dtype."""
    torch._check(x.shape == ref.shape, lambda: f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, "
                                               f"got {tuple(x.shape)}")
    torch._check(x.dtype == ref.dtype, lambda: f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")
