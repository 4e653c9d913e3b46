"""Training objectives: one class per method, each turning a batch into a loss.

Teachers: PGD adversarial training (Madry et al. 2018) and TRADES (Zhang et al. 2019).
Students: natural, AT (PGD adversarial training), ARD (Goldblum et al. 2020) and GACD (teacher-anchored contrastive
distillation with sample reweighting; ``weighting="none"``, method "gacd_noweight", is the no-reweighting ablation;
"gacd_feature" is the feature-only transfer: the GACD loss alone, no labels, the guided attack).
The teacher of a distillation method is frozen and kept in eval mode.

Each method is built by name through :func:`build_method` from a resolved config and the built
objects it needs (:class:`MethodInputs`); the names, their help and their factories are registered
in :mod:`.method_registry`.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import PGD, GACDLoss
from ..attacks import logits_of
from .data import iterate
from .method_registry import methods_of

if TYPE_CHECKING:
    from .config import DistillConfig, TeacherConfig

ATTACK_OBJECTIVES = ("ce", "guided")


@dataclass
class AttackSpec:
    """The training attack: PGD-``steps`` with step ``alpha`` in the L-inf ball of radius ``eps``."""

    eps: float
    alpha: float
    steps: int


@dataclass(frozen=True)
class MethodInputs:
    """What a method factory needs besides the options: the training attack, the frozen teacher
    (methods registered with ``needs_teacher``), the student's feature width and the number of
    training samples (GACD's embedding head and memory bank)."""

    attack: AttackSpec
    teacher: nn.Module | None = None
    student_dim: int | None = None
    num_data: int | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # the logits the accuracy of the step is measured on
    parts: dict[str, float]


class Method(nn.Module):
    """A training objective. Its own parameters (e.g. GACD's embedding heads) are trained too."""

    @classmethod
    def from_config(cls, cfg: Any, inputs: MethodInputs) -> Method:
        """The factory :mod:`.method_registry` names: this method from ``cfg`` (the resolved
        TeacherConfig or DistillConfig) and ``inputs``. A method with no option of its own needs no
        override."""
        return cls()

    def prepare(self, train: Any, device: torch.device | str) -> None:
        """Called once before the first epoch of a fresh (not resumed) run; no-op by default."""

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> StepOutput:
        raise NotImplementedError


class Natural(Method):
    def step(self, model, x, y, index):
        logits = logits_of(model(x))
        return StepOutput(F.cross_entropy(logits, y), logits, {})


class PGDAT(Method):
    """Madry et al.: CE on PGD examples crafted against the model (in eval mode, as torchattacks)."""

    def __init__(self, attack: AttackSpec) -> None:
        super().__init__()
        self.attack = attack

    @classmethod
    def from_config(cls, cfg: Any, inputs: MethodInputs) -> PGDAT:
        return cls(inputs.attack)

    def step(self, model, x, y, index):
        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps)(x, y)
        logits = logits_of(model(x_adv))
        return StepOutput(F.cross_entropy(logits, y), logits, {})


class TRADES(Method):
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising that KL. TRADES starts from
    x + 0.001 N(0, 1); here PGD's uniform start in the eps ball (the KL has zero gradient at x)."""

    def __init__(self, attack: AttackSpec, beta: float = 6.0) -> None:
        super().__init__()
        self.attack, self.beta = attack, beta

    @classmethod
    def from_config(cls, cfg: TeacherConfig, inputs: MethodInputs) -> TRADES:
        return cls(inputs.attack, cfg.trades_beta)

    def step(self, model, x, y, index):
        with torch.no_grad(), _eval(model):
            p_clean = F.softmax(logits_of(model(x)), 1)

        def kl(out: Any, _y: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits_of(out), 1), p_clean, reduction="sum")

        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps, loss=kl)(x, y)
        logits = logits_of(model(x))
        robust = F.kl_div(F.log_softmax(logits_of(model(x_adv)), 1), F.softmax(logits, 1), reduction="batchmean")
        ce = F.cross_entropy(logits, y)
        return StepOutput(ce + self.beta * robust, logits, {"ce": float(ce.detach()), "kl": float(robust.detach())})


class _eval:
    """Context: model in eval mode, flags restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, t in self.flags:
            m.training = t


class Distill(Method):
    """Base of the teacher-guided students: holds the frozen teacher."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        # stored outside the module tree so method.parameters()/state_dict() never include it
        self.__dict__["teacher"] = teacher

    def teacher_out(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.teacher.eval()  # frozen and in eval mode during distillation, whatever a caller did
        with torch.no_grad():
            f_t, logit_t = self.teacher(x)
        return f_t, logit_t


class ARD(Distill):
    """ARD main.py: alpha * T^2 * KL(S(x_adv)/T || T(x)/T) + (1 - alpha) * CE(S(x), y), the attack
    PGD on the student's CE. KLDivLoss with the default element-wise mean, as ARD's code does."""

    def __init__(self, teacher: nn.Module, attack: AttackSpec, temperature: float = 30.0, alpha: float = 1.0,
                 kl_reduction: str = "mean") -> None:
        super().__init__(teacher)
        if kl_reduction not in ("mean", "batchmean"):
            raise ValueError(f"kl_reduction must be 'mean' (ARD's code) or 'batchmean', got {kl_reduction!r}")
        self.attack, self.temperature, self.alpha = attack, temperature, alpha
        self.kl_reduction = kl_reduction

    @classmethod
    def from_config(cls, cfg: DistillConfig, inputs: MethodInputs) -> ARD:
        return cls(_teacher(inputs), inputs.attack, cfg.ard_temperature, cfg.ard_alpha, cfg.ard_kl_reduction)

    def step(self, model, x, y, index):
        _, logit_t = self.teacher_out(x)
        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps)(x, y)
        logits_adv = logits_of(model(x_adv))
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits_adv / t, 1), F.softmax(logit_t / t, 1), reduction=self.kl_reduction)
        loss = self.alpha * t * t * kl
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * F.cross_entropy(logits_of(model(x)), y)
        return StepOutput(loss, logits_adv, {"kl": float(kl.detach())})


class GACD(Distill):
    """GACD: ce_weight * CE(S(x_adv or x), y) + gacd_weight * GACDLoss(S_feat(x_adv), T_feat(x)).

    attack_objective "guided" (GACD's own attack): x_adv maximises the GACD contrastive loss of the
    student against the teacher's clean anchors (no labels; the bank is not updated while
    attacking); "ce": x_adv maximises the student's CE (ARD style). Negatives are drawn once per
    batch and shared by attack and loss. ``ce_weight=0`` with the guided attack and
    ``weighting="none"`` is the feature-only transfer (method "gacd_feature"): no label is used.
    ``prefill``: write the teacher's embeddings of the whole training set into the bank before
    the first step (exact rows from the start; see GACDLoss.prefill).
    """

    def __init__(
        self,
        teacher: nn.Module,
        criterion: GACDLoss,
        attack: AttackSpec,
        *,
        ce_weight: float = 1.0,
        gacd_weight: float = 1.0,
        ce_input: str = "adv",
        attack_objective: str = "guided",
        prefill: bool = True,
    ) -> None:
        super().__init__(teacher)
        if ce_input not in ("adv", "clean"):
            raise ValueError(f"ce_input must be 'adv' or 'clean', got {ce_input!r}")
        if attack_objective not in ATTACK_OBJECTIVES:
            raise ValueError(f"attack_objective must be one of {ATTACK_OBJECTIVES}, got {attack_objective!r}")
        self.criterion = criterion
        self.attack = attack
        self.ce_weight, self.gacd_weight = ce_weight, gacd_weight
        self.ce_input, self.attack_objective = ce_input, attack_objective
        self.prefill = prefill

    @classmethod
    def from_config(cls, cfg: DistillConfig, inputs: MethodInputs) -> GACD:
        """The GACDLoss of ``cfg`` between the student's features (``inputs.student_dim``) and the
        teacher's, with a bank over ``inputs.num_data`` samples."""
        teacher = _teacher(inputs)
        if inputs.student_dim is None or inputs.num_data is None:
            raise ValueError("GACD needs MethodInputs.student_dim and MethodInputs.num_data, got "
                             f"{inputs.student_dim!r} and {inputs.num_data!r}")
        criterion = GACDLoss(
            inputs.student_dim, teacher.feature_dim, inputs.num_data, embed_dim=cfg.embed_dim,
            num_negatives=cfg.num_negatives, temperature=cfg.nce_temperature, momentum=cfg.nce_momentum,
            bank=cfg.bank, teacher_head=cfg.teacher_head, weighting=cfg.weighting, bank_dtype=cfg.bank_dtype,
        )
        return cls(teacher, criterion, inputs.attack, ce_weight=cfg.ce_weight, gacd_weight=cfg.gacd_weight,
                   ce_input=cfg.ce_input, attack_objective=cfg.attack_objective, prefill=cfg.prefill_bank)

    def prepare(self, train: Any, device: torch.device | str) -> None:
        if not self.prefill:
            return
        for x, _, index in iterate(train, 512, device=device):
            self.criterion.prefill(self.teacher_out(x)[0], index)

    def step(self, model, x, y, index):
        f_t, logit_t = self.teacher_out(x)
        contrast = self.criterion.sample_contrast_index(index)
        weigh = {} if self.criterion.weighting == "none" else {"teacher_logits": logit_t, "targets": y}
        if self.attack_objective == "guided":
            def objective(out: Any, _targets: torch.Tensor) -> torch.Tensor:
                return self.criterion(out[0], f_t, index, contrast, update_bank=False, **weigh)
            loss_fn: Any = objective
        else:
            loss_fn = "ce"
        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps, loss=loss_fn)(x, y)
        f_s, logits_adv = model(x_adv)
        contrastive = self.criterion(f_s, f_t, index, contrast, update_bank=True, **weigh)
        parts = {"gacd": float(contrastive.detach())}
        loss = self.gacd_weight * contrastive
        if self.ce_weight:
            logits_ce = logits_adv if self.ce_input == "adv" else logits_of(model(x))
            ce = F.cross_entropy(logits_ce, y)
            loss = loss + self.ce_weight * ce
            parts["ce"] = float(ce.detach())
        return StepOutput(loss, logits_adv, parts)


def _teacher(inputs: MethodInputs) -> nn.Module:
    """The frozen teacher of a distillation method (a clear error when a direct caller left it out)."""
    if inputs.teacher is None:
        raise ValueError("a distillation method needs MethodInputs.teacher, the frozen teacher; got None")
    return inputs.teacher


def build_method(role: str, name: str, cfg: TeacherConfig | DistillConfig, inputs: MethodInputs) -> Method:
    """The ``role`` ("teacher" or "student") method registered as ``name``, built by its factory
    from ``cfg`` (a resolved config; the entry's ``options`` set on a copy) and ``inputs``."""
    registry = methods_of(role)
    info = registry.get(name)
    if info is None:
        raise ValueError(f"{role} method must be one of {tuple(registry)}, got {name!r}")
    if info.needs_teacher and inputs.teacher is None:
        raise ValueError(f"method {name!r} needs a teacher checkpoint (--teacher)")
    module, _, qualname = info.factory.partition(":")
    factory: Any = importlib.import_module(module)
    for attr in qualname.split("."):
        factory = getattr(factory, attr)
    return factory(dataclasses.replace(cfg, **info.options), inputs)
