"""Training objectives: one class per method, each turning a batch into a loss.

Teachers: PGD adversarial training (Madry et al. 2018) and TRADES (Zhang et al. 2019).
Students: natural, AT (PGD adversarial training), the soft-label distillations ARD (Goldblum et al.
2020), RSLAD (Zi et al. 2021), IAD (Zhu et al. 2022) and AdaAD (Huang et al. 2023), and GACD
(teacher-anchored contrastive distillation with sample reweighting; ``weighting="none"``, method
"gacd_noweight", is the no-reweighting ablation; "gacd_guided" trains on GACD's own attack;
"gacd_feature" is the feature-only transfer: the GACD loss alone, no labels, the guided attack).
The teacher of a distillation method is frozen and kept in eval mode.

Each method is built by name through :func:`.method_registry.build_method` from a resolved config
and the built objects it needs (:class:`MethodInputs`); the names, their help and their factories
(each class's ``from_config``) are registered in :mod:`.method_registry`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import PGD, GACDLoss
from ..attacks import logits_of
from .data import iterate

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
        """The factory registered in :mod:`.method_registry`: this method from ``cfg`` (the resolved
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


KL_REDUCTIONS = ("mean", "batchmean")


def _check_kl_reduction(kl_reduction: str) -> str:
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be 'mean' (element-wise, the published codes) or 'batchmean', "
                         f"got {kl_reduction!r}")
    return kl_reduction


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(teacher_logits / T) || softmax(student_logits / T)), both [B, C] float, as
    ``nn.KLDivLoss`` computes it: ``reduction="mean"`` averages over the B x C elements (PyTorch's
    default, what ARD, RSLAD and AdaAD call), ``"batchmean"`` sums over classes and averages over
    the batch (= C x "mean"), ``"sum"`` sums, ``"none"`` gives the [B] per-sample KLs. A 0-dim
    float32 tensor (or [B]); gradients flow to both sides unless a side is detached."""
    kl = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                  reduction="none")
    if reduction == "none":
        return kl.sum(1)
    if reduction == "batchmean":
        return kl.sum() / kl.shape[0]
    return kl.sum() if reduction == "sum" else kl.mean()


class ARD(Distill):
    """ARD main.py: alpha * T^2 * KL(S(x_adv)/T || T(x)/T) + (1 - alpha) * CE(S(x), y), the attack
    PGD on the student's CE. KLDivLoss with the default element-wise mean, as ARD's code does."""

    def __init__(self, teacher: nn.Module, attack: AttackSpec, temperature: float = 30.0, alpha: float = 1.0,
                 kl_reduction: str = "mean") -> None:
        super().__init__(teacher)
        self.attack, self.temperature, self.alpha = attack, temperature, alpha
        self.kl_reduction = _check_kl_reduction(kl_reduction)

    @classmethod
    def from_config(cls, cfg: DistillConfig, inputs: MethodInputs) -> ARD:
        return cls(_teacher(inputs), inputs.attack, cfg.ard_temperature, cfg.ard_alpha, cfg.ard_kl_reduction)

    def step(self, model, x, y, index):
        _, logit_t = self.teacher_out(x)
        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps)(x, y)
        logits_adv = logits_of(model(x_adv))
        t = self.temperature
        kl = soft_label_kl(logits_adv, logit_t, temperature=t, reduction=self.kl_reduction)
        loss = self.alpha * t * t * kl
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * F.cross_entropy(logits_of(model(x)), y)
        return StepOutput(loss, logits_adv, {"kl": float(kl.detach())})


class RSLAD(Distill):
    """RSLAD (Zi et al., ICCV 2021, "Revisiting Adversarial Robustness Distillation: Robust Soft
    Labels Make Student Better"; its code: rslad_loss.py and resnet18_rslad_cifar10.py).

    Objective: ``adv_weight * KL(T(x) || S(x')) + (1 - adv_weight) * KL(T(x) || S(x))`` with the
    teacher's clean soft labels T(x) (temperature 1) as the target of both terms, adv_weight 5/6.
    The attack x' maximises sum_i KL(T(x_i) || S(x'_i)) (the distance to those labels, no hard
    label) by PGD against the student in eval mode. The published KL is the element-wise mean
    over B x C (``kl_reduction="mean"``) of ``-log S * T + log(T + 1e-5) * T``: the 1e-5 moves
    each element by at most 1e-5 and not the gradient; here the exact KL. The published attack
    starts at x + 0.001 N(0, 1); here at x (the KL to the teacher's labels is not flat there).
    """

    def __init__(self, teacher: nn.Module, attack: AttackSpec, adv_weight: float = 5 / 6,
                 kl_reduction: str = "mean") -> None:
        super().__init__(teacher)
        self.attack, self.adv_weight = attack, adv_weight
        self.kl_reduction = _check_kl_reduction(kl_reduction)

    @classmethod
    def from_config(cls, cfg: DistillConfig, inputs: MethodInputs) -> RSLAD:
        return cls(_teacher(inputs), inputs.attack, cfg.rslad_adv_weight, cfg.kd_kl_reduction)

    def step(self, model, x, y, index):
        _, logit_t = self.teacher_out(x)

        def away_from_teacher(out: Any, _y: torch.Tensor) -> torch.Tensor:
            return soft_label_kl(logits_of(out), logit_t, reduction="sum")

        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps, random_start=False,
                    loss=away_from_teacher)(x, y)
        logits_adv = logits_of(model(x_adv))
        loss, parts = self.objective(logits_adv, logits_of(model(x)), logit_t)
        return StepOutput(loss, logits_adv, parts)

    def objective(self, logits_adv: torch.Tensor, logits_nat: torch.Tensor,
                  logit_t: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss (0-dim) and its parts from the student's logits [B, C] at x' and x and the
        teacher's [B, C] at x."""
        kl_adv = soft_label_kl(logits_adv, logit_t, reduction=self.kl_reduction)
        kl_nat = soft_label_kl(logits_nat, logit_t, reduction=self.kl_reduction)
        loss = self.adv_weight * kl_adv + (1 - self.adv_weight) * kl_nat
        return loss, {"kl_adv": float(kl_adv.detach()), "kl_nat": float(kl_nat.detach())}


class IAD(Distill):
    """IAD, introspective adversarial distillation (Zhu et al., ICLR 2022, "Reliable Adversarial
    Distillation with Unreliable Teachers"; its code: IAD-I.py, the ARD-based variant).

    Objective, per batch of B: ``alpha * tau^2 * (1/B) sum_i KL(T(x_i)/tau || S(x'_i)/tau)
    + alpha * (1/B) sum_i (1 - P_T(y_i | x'_i)^beta) KL(S(x_i) || S(x'_i))
    + (1 - alpha) * CE(S(x), y)``. The student trusts the teacher's clean soft labels, and where
    the teacher itself is unsure of the true class on the adversarial example (P_T(y | x'), its
    confidence there, raised to beta = 0.1) it also matches its own clean prediction: the
    introspection term (gradient through both S(x) and S(x'), as published). The introspection
    term starts after ``begin_steps`` optimizer steps (IAD: epoch 60 of 200; a buffer counts the
    steps, so --resume continues the schedule). Defaults as IAD-I.py: alpha 1, tau 1, beta 0.1; the
    attack PGD on the student's CE, as ARD's.
    """

    def __init__(self, teacher: nn.Module, attack: AttackSpec, *, alpha: float = 1.0, temperature: float = 1.0,
                 beta: float = 0.1, begin_steps: int = 0) -> None:
        super().__init__(teacher)
        if begin_steps < 0:
            raise ValueError(f"begin_steps must be >= 0, got {begin_steps}")
        self.attack, self.alpha, self.temperature, self.beta = attack, alpha, temperature, beta
        self.begin_steps = begin_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: DistillConfig, inputs: MethodInputs) -> IAD:
        """begin_steps: round(iad_begin x epochs) whole epochs of ceil(num_data / batch_size) steps."""
        if inputs.num_data is None:
            raise ValueError("IAD needs MethodInputs.num_data (its introspection starts after whole epochs), got None")
        per_epoch = math.ceil(inputs.num_data / cfg.batch_size)
        return cls(_teacher(inputs), inputs.attack, alpha=cfg.iad_alpha, temperature=cfg.iad_temperature,
                   beta=cfg.iad_beta, begin_steps=round(cfg.iad_begin * cfg.epochs) * per_epoch)

    def step(self, model, x, y, index):
        _, logit_t = self.teacher_out(x)
        x_adv = PGD(model, self.attack.eps, self.attack.alpha, self.attack.steps)(x, y)
        logits_adv = logits_of(model(x_adv))
        introspect = bool(self.steps_done >= self.begin_steps)
        logits_nat = logits_of(model(x)) if introspect or self.alpha < 1 else None
        logit_t_adv = self.teacher_out(x_adv)[1] if introspect else None
        loss, parts = self.objective(logits_adv, logits_nat, logit_t, logit_t_adv, y)
        if self.training:
            self.steps_done += 1
        return StepOutput(loss, logits_adv, parts)

    def objective(self, logits_adv: torch.Tensor, logits_nat: torch.Tensor | None, logit_t: torch.Tensor,
                  logit_t_adv: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss (0-dim) and its parts from the student's logits [B, C] at x' and x, the
        teacher's at x and at x' (None: before the introspection starts) and the labels [B];
        ``logits_nat`` may be None only when neither introspection nor CE needs it."""
        t = self.temperature
        kl_teacher = soft_label_kl(logits_adv, logit_t, temperature=t, reduction="batchmean")
        loss = self.alpha * t * t * kl_teacher
        parts = {"kl_teacher": float(kl_teacher.detach())}
        if logit_t_adv is not None:
            trust = F.softmax(logit_t_adv, 1).gather(1, y[:, None]).squeeze(1).pow(self.beta)
            introspection = ((1 - trust) * soft_label_kl(logits_adv, logits_nat, reduction="none")).mean()
            loss = loss + self.alpha * introspection
            parts["introspection"] = float(introspection.detach())
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * F.cross_entropy(logits_nat, y)
        return loss, parts


class _StudentTeacher(nn.Module):
    """The student and the frozen teacher on the same input: (student logits, teacher logits),
    what AdaAD's attack differentiates (through both networks)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_of(self.student(x)), logits_of(self.teacher(x))


class AdaAD(Distill):
    """AdaAD, adaptive adversarial distillation (Huang et al., CVPR 2023, "Boosting Accuracy and
    Robustness of Student Models via Adaptive Adversarial Distillation"; its code: main.py and
    AT_helper.adaad_inner_loss).

    The attack x' maximises sum_i KL(T(x'_i) || S(x'_i)): the teacher also sees the adversarial
    input, and the input gradient flows through both networks (student and teacher in eval mode),
    so x' is where the two disagree most. The objective matches them there:
    ``alpha * KL(T(x') || S(x')) + (1 - alpha) * KL(T(x) || S(x))``, alpha 1 (main.py's AdaAD_alpha),
    temperature 1, KLDivLoss's element-wise mean on CIFAR-10 (``kl_reduction="mean"``). The
    published attack starts at x + 0.001 N(0, 1); here at x (the divergence is not flat there).
    """

    def __init__(self, teacher: nn.Module, attack: AttackSpec, alpha: float = 1.0, kl_reduction: str = "mean") -> None:
        super().__init__(teacher)
        self.attack, self.alpha = attack, alpha
        self.kl_reduction = _check_kl_reduction(kl_reduction)

    @classmethod
    def from_config(cls, cfg: DistillConfig, inputs: MethodInputs) -> AdaAD:
        return cls(_teacher(inputs), inputs.attack, cfg.adaad_alpha, cfg.kd_kl_reduction)

    def step(self, model, x, y, index):
        def disagreement(out: Any, _y: torch.Tensor) -> torch.Tensor:
            return soft_label_kl(out[0], out[1], reduction="sum")

        self.teacher.eval()
        pair = _StudentTeacher(model, self.teacher)
        x_adv = PGD(pair, self.attack.eps, self.attack.alpha, self.attack.steps, random_start=False,
                    loss=disagreement)(x, y)
        logits_adv = logits_of(model(x_adv))
        nat = (logits_of(model(x)), self.teacher_out(x)[1]) if self.alpha < 1 else (None, None)
        loss, parts = self.objective(logits_adv, self.teacher_out(x_adv)[1], *nat)
        return StepOutput(loss, logits_adv, parts)

    def objective(self, logits_adv: torch.Tensor, logit_t_adv: torch.Tensor, logits_nat: torch.Tensor | None = None,
                  logit_t_nat: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss (0-dim) and its parts from the student's and the teacher's logits [B, C] at x'
        and (needed only when alpha < 1) at x."""
        kl_adv = soft_label_kl(logits_adv, logit_t_adv, reduction=self.kl_reduction)
        loss = self.alpha * kl_adv
        parts = {"kl_adv": float(kl_adv.detach())}
        if self.alpha < 1:
            kl_nat = soft_label_kl(logits_nat, logit_t_nat, reduction=self.kl_reduction)
            loss = loss + (1 - self.alpha) * kl_nat
            parts["kl_nat"] = float(kl_nat.detach())
        return loss, parts


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
        self.criterion.prefill_from(self.teacher, iterate(train, 512, device=device))

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
