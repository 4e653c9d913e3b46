"""The training methods by name: what each one is, what it needs, and the factory that builds it.

A method is one class in :mod:`.methods` (or any module) with a factory ``(cfg, inputs) -> Method``
(its ``from_config`` classmethod), and one :func:`register_method` call below. Everything else
derives from this registry: the CLI's ``--method``/``--methods``/``--teacher-method`` choices and
help (:mod:`.config`), whether the pipeline loads a teacher, which students the demo trains by
default, which run once per bank, and which are judged by their probe alone (:mod:`.pipeline`).
The factory is stored itself (the option layer imports torch through :mod:`.methods`, as the
package itself does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import methods as M

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class MethodInfo:
    """One registered training method.

    ``factory``: a callable ``(cfg, inputs: methods.MethodInputs) -> Method`` (a class's
    ``from_config``), where ``cfg`` is the resolved TeacherConfig (role "teacher") or DistillConfig
    (role "student").
    ``options``: config values that define this variant, set on ``cfg`` before the factory sees it
    (e.g. "gacd_noweight" is "gacd" with ``weighting="none"``).
    ``needs_teacher``: the factory needs the frozen teacher (``--teacher``).
    ``uses_bank``: trains a GACD negative bank (the demo/study run it once per ``--banks`` value).
    ``probe_only``: its classifier is never trained; judge it by the feature-probe columns.
    ``in_demo``: among the demo's default students (the others run in ``study`` or by ``--methods``,
    keeping ``make demo`` to a few minutes).
    """

    name: str
    role: str
    help: str
    factory: Callable[[Any, Any], Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_teacher: bool = False
    uses_bank: bool = False
    probe_only: bool = False
    in_demo: bool = True


TEACHER_METHODS: dict[str, MethodInfo] = {}
STUDENT_METHODS: dict[str, MethodInfo] = {}
_BY_ROLE = {"teacher": TEACHER_METHODS, "student": STUDENT_METHODS}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to its role's registry (in the CLI's listing order); returns it."""
    if not isinstance(info, MethodInfo):
        raise TypeError(f"register_method expects a MethodInfo, got {type(info).__name__}")
    if info.role not in ROLES:
        raise ValueError(f"MethodInfo.role must be one of {ROLES}, got {info.role!r}")
    if not callable(info.factory):
        raise TypeError(f"MethodInfo.factory must be callable as factory(cfg, inputs) (a class's from_config), "
                        f"got {type(info.factory).__name__}")
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


def demo_students() -> list[str]:
    """The students the demo trains by default (registered with ``in_demo``), in registry order."""
    return [m.name for m in STUDENT_METHODS.values() if m.in_demo]


def build_method(role: str, name: str, cfg: Any, inputs: M.MethodInputs) -> M.Method:
    """The ``role`` ("teacher" or "student") method registered as ``name``, built by its factory
    from ``cfg`` (a resolved TeacherConfig/DistillConfig; the entry's ``options`` set on a copy)
    and ``inputs``."""
    registry = methods_of(role)
    info = registry.get(name)
    if info is None:
        raise ValueError(f"{role} method must be one of {tuple(registry)}, got {name!r}")
    if info.needs_teacher and inputs.teacher is None:
        raise ValueError(f"method {name!r} needs a teacher (--teacher, or --teacher-factory)")
    return info.factory(dataclasses.replace(cfg, **info.options), inputs)


register_method(MethodInfo("at", "teacher", "PGD adversarial training, Madry et al.", M.PGDAT.from_config))
register_method(MethodInfo("trades", "teacher", "TRADES, Zhang et al.", M.TRADES.from_config))

register_method(MethodInfo("natural", "student", "cross-entropy on clean images", M.Natural.from_config))
register_method(MethodInfo("at", "student", "PGD adversarial training", M.PGDAT.from_config))
register_method(MethodInfo("ard", "student", "adversarially robust distillation, Goldblum et al. 2020",
                           M.ARD.from_config, needs_teacher=True))
register_method(MethodInfo("rslad", "student", "robust soft label adversarial distillation, Zi et al. 2021: "
                           "KL to the teacher's clean soft labels on adversarial (5/6) and clean (1/6) inputs",
                           M.RSLAD.from_config, needs_teacher=True, in_demo=False))
register_method(MethodInfo("iad", "student", "introspective adversarial distillation, Zhu et al. 2022: the teacher "
                           "trusted as far as it is confident on the adversarial example, plus self-introspection",
                           M.IAD.from_config, needs_teacher=True, in_demo=False))
register_method(MethodInfo("adaad", "student", "adaptive adversarial distillation, Huang et al. 2023: the attack "
                           "maximises the student-teacher divergence with the teacher on the adversarial input too",
                           M.AdaAD.from_config, needs_teacher=True, in_demo=False))
register_method(MethodInfo("gacd", "student", "GACD: contrastive distillation to the teacher's features, reweighted",
                           M.GACD.from_config, needs_teacher=True, uses_bank=True))
register_method(MethodInfo("gacd_noweight", "student", "GACD with weighting=none, the ablation",
                           M.GACD.from_config, options={"weighting": "none"}, needs_teacher=True, uses_bank=True))
register_method(MethodInfo("gacd_guided", "student", "GACD trained on its own guided attack (attack_objective=guided)",
                           M.GACD.from_config, options={"attack_objective": "guided"}, needs_teacher=True,
                           uses_bank=True, in_demo=False))
register_method(MethodInfo("gacd_feature", "student",
                           "feature-only transfer: the GACD loss alone, no labels, the guided attack; "
                           "judge it by the probe columns of evaluate",
                           M.GACD.from_config,
                           options={"weighting": "none", "ce_weight": 0.0, "attack_objective": "guided"},
                           needs_teacher=True, uses_bank=True, probe_only=True))
