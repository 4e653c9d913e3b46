"""What every backend takes from an op's module: the :class:`Op` and its :class:`CompiledOp` values.

Each op's module (``info_nce.py``, ``l2_normalize.py``, ...) declares the op once as an :class:`Op`:
its reference (whose signature is every backend's entry), the torch backend's implementation, and
its compiled operators. A compiled backend (``triton``, ``cext``) runs an op as
``torch.ops.<namespace>.<name>``: it calls :meth:`CompiledOp.define` for its namespace and then
registers only its kernels (Python launchers for Triton, ``TORCH_LIBRARY_IMPL`` in csrc/ for the
extension), so the backends cannot disagree on a schema, a fake or a gradient formula. The
backends' entries themselves are built from the ``Op`` values in ``entries.py``.
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


@dataclass(frozen=True)
class Op:
    """One op as every backend sees it.

    name: the op; also the name of its module in gacd_fast/ops/, kernels/ and csrc/{cpu,cuda}/.
    entry: the name of its function in every backend module (the registry's key, e.g. ``info_nce_rows``).
    reference: the definition (the test oracle); its positional arguments are the entry's.
    torch: the torch backend's implementation (None: ``reference``).
    compiled: the compiled operators, forward first; empty when no compiled backend runs the op.
    call: how an entry runs the forward operator, ``call(forward, *args) -> result`` (the glue
        where the schema differs from the entry); None: ``forward(*args)``.
    compiled_when: ``compiled_when(*args)``, which calls the kernels take; the others run ``torch``.
    compiled_in: the compiled backends with kernels for it.
    torch_elsewhere: whether a compiled backend without kernels for it runs ``torch`` (True) or
        leaves the op out (False: naming that backend for it is a NotImplementedError).
    self_check: ``self_check(entry, device, dtype, (atol, rtol))``, the first-use check of a
        backend's entry against the reference (``self_check.py``); None: the op is not checked.
    """

    name: str
    entry: str
    reference: Callable[..., Any]
    torch: Optional[Callable[..., Any]] = None
    compiled: tuple[CompiledOp, ...] = ()
    call: Optional[Callable[..., Any]] = None
    compiled_when: Optional[Callable[..., bool]] = None
    compiled_in: tuple[str, ...] = ("triton", "cext")
    torch_elsewhere: bool = False
    self_check: Optional[Callable[..., None]] = None


def second_order_error(op: str, where: str = "by the torch backend") -> str:
    """The message of a backward that refuses ``create_graph=True``."""
    return f"second-order gradients (create_graph=True) through {op} are supported only {where}"


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
