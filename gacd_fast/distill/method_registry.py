"""The training methods by name: what each one is, what it needs, and where it is built.

A method is one class in :mod:`.methods` (or any module) with a factory ``(cfg, inputs) -> Method``
(usually its ``from_config`` classmethod), and one :func:`register_method` call below. Everything
else derives from this registry: the CLI's ``--method``/``--methods``/``--teacher-method`` choices
and help (:mod:`.config`), whether the pipeline loads a teacher, which students run once per bank,
and which are judged by their probe alone (:mod:`.pipeline`).

This module imports no torch, on purpose. :mod:`.config` reads it to build the option choices, and
option parsing should not need torch; the factory is therefore named as ``"module:qualname"`` and
imported only when a method is built (:func:`.methods.build_method`). (Today ``import gacd_fast``
itself imports torch, so the CLI does not start faster yet; this keeps the option layer free of it
for when the package imports lazily.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class MethodInfo:
    """One registered training method.

    ``factory``: ``"module:qualname"`` of a callable ``(cfg, inputs: methods.MethodInputs) -> Method``,
    where ``cfg`` is the resolved TeacherConfig (role "teacher") or DistillConfig (role "student").
    ``options``: config values that define this variant, set on ``cfg`` before the factory sees it
    (e.g. "gacd_noweight" is "gacd" with ``weighting="none"``).
    ``needs_teacher``: the factory needs the frozen teacher (``--teacher``).
    ``uses_bank``: trains a GACD negative bank (the demo/study run it once per ``--banks`` value).
    ``probe_only``: its classifier is never trained; judge it by the feature-probe columns.
    """

    name: str
    role: str
    help: str
    factory: str
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_teacher: bool = False
    uses_bank: bool = False
    probe_only: bool = False


TEACHER_METHODS: dict[str, MethodInfo] = {}
STUDENT_METHODS: dict[str, MethodInfo] = {}
_BY_ROLE = {"teacher": TEACHER_METHODS, "student": STUDENT_METHODS}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to its role's registry (in the CLI's listing order); returns it."""
    if not isinstance(info, MethodInfo):
        raise TypeError(f"register_method expects a MethodInfo, got {type(info).__name__}")
    if info.role not in ROLES:
        raise ValueError(f"MethodInfo.role must be one of {ROLES}, got {info.role!r}")
    module, sep, qualname = info.factory.partition(":")
    if not (module and sep and qualname):
        raise ValueError(f"MethodInfo.factory must be 'module:qualname', got {info.factory!r}")
    registry = _BY_ROLE[info.role]
    if info.name in registry:
        raise ValueError(f"{info.role} method {info.name!r} is already registered")
    registry[info.name] = info
    return info


def methods_of(role: str) -> dict[str, MethodInfo]:
    """The live registry of ``role`` ("teacher" or "student"), name -> MethodInfo."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return _BY_ROLE[role]


def method_help(role: str) -> str:
    """``"name (help) | name (help) | ..."`` of the registered methods of ``role``: CLI help text."""
    return " | ".join(f"{m.name} ({m.help})" for m in methods_of(role).values())


_METHODS = f"{__package__}.methods"

register_method(MethodInfo("at", "teacher", "PGD adversarial training, Madry et al.", f"{_METHODS}:PGDAT.from_config"))
register_method(MethodInfo("trades", "teacher", "TRADES, Zhang et al.", f"{_METHODS}:TRADES.from_config"))

register_method(MethodInfo("natural", "student", "cross-entropy on clean images", f"{_METHODS}:Natural.from_config"))
register_method(MethodInfo("at", "student", "PGD adversarial training", f"{_METHODS}:PGDAT.from_config"))
register_method(MethodInfo("ard", "student", "adversarially robust distillation, Goldblum et al.",
                           f"{_METHODS}:ARD.from_config", needs_teacher=True))
register_method(MethodInfo("gacd", "student", "GACD: contrastive distillation to the teacher's features, reweighted",
                           f"{_METHODS}:GACD.from_config", needs_teacher=True, uses_bank=True))
register_method(MethodInfo("gacd_noweight", "student", "GACD with weighting=none, the ablation",
                           f"{_METHODS}:GACD.from_config", options={"weighting": "none"},
                           needs_teacher=True, uses_bank=True))
register_method(MethodInfo("gacd_feature", "student",
                           "feature-only transfer: the GACD loss alone, no labels, the guided attack; "
                           "judge it by the probe columns of evaluate",
                           f"{_METHODS}:GACD.from_config",
                           options={"weighting": "none", "ce_weight": 0.0, "attack_objective": "guided"},
                           needs_teacher=True, uses_bank=True, probe_only=True))
