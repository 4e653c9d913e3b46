"""Run configurations: dataclasses whose fields are the CLI options (with their help text),
loadable from YAML or JSON (``--config``) and written next to the results.

A field left at ``None`` takes the dataset's default from :data:`DATASET_DEFAULTS` (see
:func:`resolve`); each default there cites the recipe it comes from.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._precision import PRECISIONS
from ..loss import TEACHER_HEADS
from ..memory import BANK_DTYPES, BANKS
from .atomic import atomic_write_text
from .external_teacher import check_options as check_teacher_source
from .method_registry import STUDENT_METHODS, TEACHER_METHODS, demo_students, method_help

DATASET_CHOICES = ("digits", "mnist5k", "cifar10", "cifar100", "stl10")
MODEL_CHOICES = ("small_cnn_teacher", "small_cnn_student", "small_cnn_teacher_stride2", "small_cnn_student_stride2", "resnet18", "preact_resnet18", "wrn_34_10", "mobilenetv2")
# The method choices are the registries' live key views: a method registered later is accepted too.
STUDENT_CHOICES = STUDENT_METHODS.keys()
TEACHER_METHOD_CHOICES = TEACHER_METHODS.keys()
# The library's own option names (the option layer imports torch through the method registry anyway)
BANK_CHOICES = tuple(BANKS)  # the bank classes' kinds
TEACHER_HEAD_CHOICES = TEACHER_HEADS
PRECISION_CHOICES = PRECISIONS
BANK_DTYPE_CHOICES = tuple(BANK_DTYPES)

T = TypeVar("T")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# Per-dataset defaults, used for fields left at None.
# Digits eps, measured (PGD-20, step eps/4, 360 test images; small CNNs, 10-15 epochs, PGD-5 training
# at 0.2): eps 0.10 natural 27% / PGD-trained teacher 91%; 0.15: 1% / 80%; 0.20: 0% / 61%;
# 0.25: 0% / 33%; 0.30: 0% / 8%. 0.2 is where the natural model has collapsed and the teacher
# keeps real robustness.
DIGITS_EPS = 0.2
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(
        # 8x8 images in [0, 1]: eps 0.2 (see DIGITS_EPS); step eps/4 as CIFAR's 2/255 of 8/255;
        # PGD-5 and 12 epochs keep the demo to a few CPU minutes.
        eps=DIGITS_EPS, alpha=DIGITS_EPS / 4, attack_steps=5,
        batch_size=64, epochs=12, lr=0.05, momentum=0.9, weight_decay=5e-4,
        teacher_model="small_cnn_teacher", student_model="small_cnn_student",
        # 1,437 training samples: 16,384 negatives would repeat every row ~11 times; 1024 sampled rows.
        # tau stays CRD's 0.07. (Measured with CRD's trained teacher head, one seed: tau 0.07-0.5, K 64-1024,
        # memory momentum 0.9 and the symmetric loss all left PGD-20 within noise, because that head made the
        # contrastive term degenerate: docs/bank_study.md, which also measures the frozen head and prefill
        # that fixed it.)
        num_negatives=1024,
        # ARD's element-wise mean KL is (batchmean KL)/C: with T=30 and 12 epochs the student stays at
        # ~30% clean accuracy (measured); ARD compensates with 200 epochs (RSLAD multiplies by 10 on
        # CIFAR-100). batchmean (x C) reaches ~96% clean / ~51% PGD-20 in 12 epochs.
        ard_kl_reduction="batchmean",
        # the real cross-task transfer: MNIST-5k's digits at 8x8 (the reverse of mnist5k -> digits-28),
        # its probe attacked at eps/4: measured (seed 0's teacher / natural / AT students, PGD-20 on the
        # 1,000 test digits) at 0.1: 4.0 / 0.0 / 6.4%, every probe broken; at 0.05: 40.5 / 8.4 / 34.7%;
        # at 0.03: 65.4 / 33.9 / 56.5%. (On the transposed digits eps/2 = 0.1 separated them.)
        transfer="mnist5k-8",
        probe_eps=DIGITS_EPS / 4,
        # the same-task probe on frozen features (feature-only transfer) is attacked at 0.15: there the
        # natural student's probe is ~1% and the teacher's ~68% (3 seeds, docs/bank_study.md)
        feature_probe_eps=0.15,
        teacher_epochs=15, student_epochs=12,
    ),
    "mnist5k": dict(
        # MNIST's standard L-inf radius 0.3 (Madry et al.). Measured (teacher, 1 seed, 2-core CPU): batch 128 with
        # PGD-5 step eps/4 was still at 18% adversarial train accuracy / 26% clean test after 4 of 10 epochs (320
        # SGD steps in all: too few); batch 32 with PGD-3 step 0.1 (4x the steps for less compute) reached 36% / 76%
        # after 3 epochs.
        eps=0.3, alpha=0.1, alpha_div=3, attack_steps=3,
        batch_size=32, epochs=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
        # the digits CNNs with a stride-2 stem: 28x28 at a quarter of the compute (2-core CPU runs)
        teacher_model="small_cnn_teacher_stride2", student_model="small_cnn_student_stride2",
        # the transfer probe on scikit-learn's digits upsampled to 28x28 (smooth strokes: fragile), attacked at
        # 0.05. Measured (seed 0's teacher / a natural student, PGD-20 on the 360 test digits): at 0.15
        # 0.3 / -%, at 0.1 4.7 / -%, at 0.05 60.3 / 0.0%, at 0.03 82.2 / 0.0%.
        num_negatives=1024, ard_kl_reduction="batchmean", transfer="digits-28", probe_eps=0.05,
        # the same-task probe at 0.2: the natural student's probe 0.2%, the teacher's 63% (docs/bank_study.md)
        feature_probe_eps=0.2,
        teacher_epochs=8, student_epochs=8,
    ),
    "cifar10": dict(
        # ARD main.py: PGD-10, eps 8/255, step 2/255; SGD lr 0.1, momentum 0.9, wd 2e-4, 200 epochs, batch 128
        eps=8 / 255, alpha=2 / 255, attack_steps=10,
        batch_size=128, epochs=200, lr=0.1, momentum=0.9, weight_decay=2e-4,
        # ARD README: TRADES WRN-34-10 teacher; ResNet-18 / MobileNetV2 students
        teacher_model="wrn_34_10", student_model="resnet18",
        num_negatives=16384,  # CRD train_student.py: nce_k=16384
        ard_kl_reduction="mean",  # ARD main.py: nn.KLDivLoss() default (element-wise) mean
        transfer="stl10", probe_eps=8 / 255, feature_probe_eps=8 / 255,
    ),
    "cifar100": dict(
        eps=8 / 255, alpha=2 / 255, attack_steps=10,
        batch_size=256,  # ARD main.py: batch 256 on CIFAR-100
        epochs=200, lr=0.1, momentum=0.9, weight_decay=2e-4,
        teacher_model="wrn_34_10", student_model="resnet18", num_negatives=16384, transfer="stl10",
        ard_kl_reduction="mean", probe_eps=8 / 255, feature_probe_eps=8 / 255,
    ),
    "stl10": dict(
        eps=8 / 255, alpha=2 / 255, attack_steps=10, batch_size=128, epochs=200, lr=0.1, momentum=0.9,
        weight_decay=2e-4, teacher_model="wrn_34_10", student_model="resnet18", num_negatives=4096,
        ard_kl_reduction="mean", transfer="none", probe_eps=8 / 255, feature_probe_eps=8 / 255,
    ),
}


@dataclass
class RunConfig:
    """Fields shared by every subcommand."""

    dataset: str = opt("digits", "dataset: digits (embedded, scikit-learn) | cifar10 | cifar100 | stl10 (the last three read from --data-dir, never downloaded)", choices=DATASET_CHOICES)
    data_dir: str | None = opt(None, "folder with the dataset files (cifar-10-batches-py/, cifar-100-python/ or stl10_binary/, or those folders themselves)")
    out_dir: str = opt("runs/out", "output folder: checkpoints, config.json/yaml, results (CSV, JSON, PNG) and the log", flag="--out", aliases=("--out-dir",))
    seed: int = opt(0, "random seed (data split, initialisation, attacks' random starts)")
    split_seed: int | None = opt(None, "seed of the train/test split and of the --train-limit/--test-limit subsets (default: --seed); keep it fixed when runs share a teacher, so that no run tests on the teacher's training images (demo/study --teacher take the teacher's)")
    device: str = opt("auto", "torch device: auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    batch_size: int | None = opt(None, "batch size (default per dataset: digits 64, CIFAR-10 128, CIFAR-100 256 as ARD)")
    train_limit: int | None = opt(None, "use only this many training samples (a seeded subset; for quick runs)")
    test_limit: int | None = opt(None, "use only this many test samples (a seeded subset; for quick runs)")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    resume: bool = opt(False, "continue an interrupted run in --out: finished models are reused, a model in training restarts from its last per-epoch checkpoint (<name>.state.pt) and ends with the same numbers as an uninterrupted run")
    progress: bool = opt(True, "tqdm progress bars on stderr (--no-progress: off); the per-epoch lines go to stdout and log.txt either way")
    deterministic: bool = opt(True, "torch.use_deterministic_algorithms (warn_only) and no cuDNN autotuning during training, so that runs repeat exactly")


@dataclass
class OptimConfig:
    """Optimiser and training-attack fields (training subcommands)."""

    epochs: int | None = opt(None, "training epochs (default: digits 12, CIFAR 200 as ARD)")
    lr: float | None = opt(None, "SGD learning rate (default: digits 0.05, CIFAR 0.1 as ARD)")
    momentum: float | None = opt(None, "SGD momentum (default 0.9, ARD)")
    weight_decay: float | None = opt(None, "weight decay (default: digits 5e-4, CIFAR 2e-4 as ARD)")
    lr_milestones: list[float] = opt([0.5, 0.75], "lr x0.1 at these fractions of the epochs (ARD: epochs 100 and 150 of 200)", nargs="+")
    eps: float | None = opt(None, "L-inf radius of the training attack (default: digits 0.2, CIFAR 8/255)")
    alpha: float | None = opt(None, "PGD step size of the training attack (default: eps/4, i.e. 2/255 on CIFAR; mnist5k eps/3)")
    attack_steps: int | None = opt(None, "PGD steps of the training attack (default: digits 5, CIFAR 10 as ARD)")


@dataclass
class SpeedConfig:
    """Precision and speed fields (training subcommands). They change the numbers a run ends with,
    so a --resume must keep them."""

    precision: str = opt("fp32", "training precision: fp32 | bf16 | fp16: the model's forward and backward in training and in the training attack, and the teacher's clean forward, under torch.autocast (fp16 with a gradient scaler); bf16/fp16 pay only where the hardware has them (a GPU, a CPU with AVX512-BF16/AMX), elsewhere they run emulated and slower", choices=PRECISION_CHOICES)
    eval_precision: str = opt("fp32", "precision of the evaluation (test accuracy, attacks, probes): keep fp32 so robust accuracies stay comparable", choices=PRECISION_CHOICES)
    channels_last: bool = opt(False, "models and image batches in channels_last memory format")
    compile: bool = opt(False, "torch.compile the trained model (measured slower on a 2-core CPU: see docs/mixed_precision.md)")


@dataclass
class ExternalTeacherConfig:
    """A teacher from any model (distill, evaluate, demo, study): see :mod:`.external_teacher`."""

    teacher_factory: str | None = opt(None, "build the teacher by calling this importable function with no arguments, 'module:function' (e.g. mypkg.models:robust_wrn): any nn.Module that returns logits (torchvision, timm, RobustBench style); instead of --teacher")
    teacher_weights: str | None = opt(None, "state dict for the --teacher-factory model: a plain state dict or one under 'state_dict', 'module.' prefixes removed, read with torch.load(weights_only=True)")
    feature_layer: str | None = opt(None, "the --teacher-factory model's submodule whose output are the teacher's features (a dotted name as in model.named_modules()); default: the input of its last nn.Linear")
    teacher_normalization: str | None = opt(None, "input normalisation of the --teacher-factory model, 'mean,std' per channel (k means then k stds, e.g. 0.1307,0.3081), applied in front of it; default: none (images in [0, 1], or a model that normalises inside)")


@dataclass
class TeacherConfig(RunConfig, OptimConfig, SpeedConfig):
    """train-teacher: adversarially train the teacher."""

    out_dir: str = opt("runs/teacher", "output folder (teacher.pt, config, log)", flag="--out", aliases=("--out-dir",))
    model: str | None = opt(None, "teacher architecture (default: digits small_cnn_teacher, CIFAR wrn_34_10)", choices=MODEL_CHOICES)
    method: str = opt("at", method_help("teacher"), choices=TEACHER_METHOD_CHOICES)
    trades_beta: float = opt(6.0, "TRADES beta (TRADES README: 6.0 for CIFAR-10)")


@dataclass
class DistillConfig(ExternalTeacherConfig, RunConfig, OptimConfig, SpeedConfig):
    """distill: train a student with or without the frozen teacher."""

    out_dir: str = opt("runs/distill", "output folder (<name>.pt, config, log)", flag="--out", aliases=("--out-dir",))
    teacher: str | None = opt(None, "teacher checkpoint (from train-teacher); needed by "
                               + ", ".join(m.name for m in STUDENT_METHODS.values() if m.needs_teacher))
    student: str | None = opt(None, "student architecture (default: digits small_cnn_student, CIFAR resnet18)", choices=MODEL_CHOICES)
    method: str = opt("gacd", method_help("student"), choices=STUDENT_CHOICES)
    name: str | None = opt(None, "checkpoint name (default: the method)")
    ard_temperature: float = opt(30.0, "ARD distillation temperature T (ARD main.py: 30)")
    ard_alpha: float = opt(1.0, "ARD weight of the KL term; 1-alpha weights clean CE (ARD main.py: 1.0)")
    ard_kl_reduction: str | None = opt(None, "ARD KL reduction: mean (element-wise, ARD's code; default on CIFAR) | batchmean (x classes; default on digits, where 'mean' does not converge in a few epochs)", choices=("mean", "batchmean"))
    kd_kl_reduction: str | None = opt(None, "KL reduction of RSLAD and AdaAD: mean (element-wise, their published code) | batchmean (x classes); default per dataset as --ard-kl-reduction", choices=("mean", "batchmean"))
    rslad_adv_weight: float = opt(5 / 6, "RSLAD weight of the KL on adversarial inputs; 1 minus it weights the KL on clean inputs (RSLAD: 5/6)")
    iad_alpha: float = opt(1.0, "IAD weight of the KL terms; 1 minus it weights clean CE (IAD-I.py: 1.0)")
    iad_temperature: float = opt(1.0, "IAD distillation temperature (IAD-I.py: 1.0)")
    iad_beta: float = opt(0.1, "IAD exponent of the teacher's confidence P_T(y|x')^beta (IAD-I.py: 0.1)")
    iad_begin: float = opt(0.3, "IAD: fraction of the epochs before the introspection term starts (IAD-I.py: epoch 60 of 200)")
    adaad_alpha: float = opt(1.0, "AdaAD weight of the KL at the adversarial input; 1 minus it weights the KL at the clean input (AdaAD main.py: 1.0)")
    embed_dim: int = opt(128, "GACD embedding width (CRD: feat_dim 128)")
    num_negatives: int | None = opt(None, "GACD negatives per sample from the memory (CRD: nce_k 16384; digits 1024)")
    nce_temperature: float = opt(0.07, "GACD contrastive temperature tau (CRD: nce_t 0.07)")
    nce_momentum: float = opt(0.5, "GACD memory momentum (CRD: nce_m 0.5)")
    bank: str = opt("memory", "GACD negatives: memory (CRD per-sample rows, sampled) | queue (MoCo FIFO) | batch (in-batch); see docs/bank_study.md", choices=BANK_CHOICES)
    teacher_head: str = opt("frozen", "GACD teacher embedding head: frozen (fixed random map: the stored rows stay exact) | train (CRD's trained embed_t: stored rows go stale; measured to degenerate, docs/bank_study.md)", choices=TEACHER_HEAD_CHOICES)
    prefill_bank: bool = opt(True, "write the teacher's embeddings of the training set into the GACD bank before the first step (--no-prefill-bank: start from CRD's random rows)")
    weighting: str = opt("confidence", "GACD sample reweighting: confidence (teacher's true-class prob) | correct | none", choices=("confidence", "correct", "none"))
    gacd_weight: float = opt(1.0, "weight of the GACD contrastive loss (CRD recommends beta 0.8; tuned on digits)")
    ce_weight: float = opt(1.0, "weight of the student's cross-entropy term in GACD")
    ce_input: str = opt("adv", "GACD's CE term on the adversarial (adv) or clean (clean) input", choices=("adv", "clean"))
    attack_objective: str = opt("ce", "GACD training attack: ce (student CE, ARD style) | guided (GACD's own: maximise the GACD loss of the student against the teacher's clean anchors, no labels)", choices=("ce", "guided"))
    bank_dtype: str = opt("fp32", "dtype of the GACD bank's stored rows: fp32 | bf16 (half the memory; accuracy cost in docs/mixed_precision.md)", choices=BANK_DTYPE_CHOICES)


@dataclass
class EvaluateConfig(ExternalTeacherConfig, RunConfig):
    """evaluate: clean/FGSM/PGD-20/CW accuracy, CKA to the teacher, transfer probe."""

    out_dir: str = opt("runs/eval", "output folder (results.csv/json/png, robust_vs_eps.png, training_curves.png, curves.json)", flag="--out", aliases=("--out-dir",))
    checkpoints: list[str] = opt([], "checkpoints to evaluate (.pt from train-teacher/distill)", nargs="*")
    teacher: str | None = opt(None, "teacher checkpoint: the reference of the CKA column (also evaluated)")
    eps: float | None = opt(None, "L-inf radius of every attack (default: digits 0.2, CIFAR 8/255)")
    alpha: float | None = opt(None, "PGD/CW step (default: the dataset's training step scaled to --eps: eps/4, 2/255 on CIFAR; mnist5k eps/3)")
    pgd_steps: int = opt(20, "PGD steps (PGD-20)")
    cw_steps: int = opt(30, "steps of the CW-inf attack (PGD on the CW margin loss)")
    transfer: str | None = opt(None, "transfer probe task: none | digits-transposed | digits-28 (scikit-learn's digits upsampled to 28x28) | mnist5k-8 (MNIST-5k downsampled to 8x8) | stl10 (default: digits -> mnist5k-8, mnist5k -> digits-28, CIFAR -> stl10 when --transfer-data-dir is given)", choices=("none", "digits-transposed", "digits-28", "mnist5k-8", "stl10"))
    transfer_data_dir: str | None = opt(None, "folder with stl10_binary/ for the CIFAR transfer probe (default: --data-dir)")
    probe_epochs: int = opt(60, "epochs of the linear probe on frozen features")
    eps_sweep: int = opt(5, "points of the robust-accuracy-vs-eps plot: PGD-(--pgd-steps) on the test set at eps 0 .. 1.5 x --eps (0: no sweep)")
    probe_eps: float | None = opt(None, "L-inf radius of the PGD attack on the transfer probe (default: digits 0.05 = eps/4, mnist5k 0.05, CIFAR 8/255)")
    feature_probe: bool = opt(True, "train a linear probe on each model's frozen features of the same task and report its clean and PGD accuracy (probe_clean, probe_pgd20): how the feature-only students (gacd_feature) are judged")
    feature_probe_eps: float | None = opt(None, "L-inf radius of the PGD attack on the same-task probe (default: digits 0.15, mnist5k 0.2, CIFAR 8/255)")
    autoattack: int = opt(0, "also run AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; torchattacks) at --eps on this many test images (0: off)")
    eval_precision: str = opt("fp32", "precision of the evaluation (attacks, probes) under torch.autocast: keep fp32 so robust accuracies stay comparable", choices=PRECISION_CHOICES)
    channels_last: bool = opt(False, "models and image batches in channels_last memory format")


@dataclass
class DemoConfig(ExternalTeacherConfig, RunConfig, SpeedConfig):
    """demo: the whole recipe (teacher, every student, evaluation) in a few minutes of CPU on the digits."""

    out_dir: str = opt("runs/demo", "output folder", flag="--out", aliases=("--out-dir",))
    teacher_method: str = opt("at", " | ".join(TEACHER_METHOD_CHOICES), choices=TEACHER_METHOD_CHOICES)
    teacher: str | None = opt(None, "reuse this teacher checkpoint (from train-teacher) instead of training one; in a study every seed then shares it")
    teacher_epochs: int | None = opt(None, "teacher epochs (default: digits 15, mnist5k 8)")
    student_epochs: int | None = opt(None, "epochs of each student (default: digits 12, mnist5k 8)")
    methods: list[str] = opt(demo_students(), "students to train (the study's default: every registered student)", nargs="+", choices=STUDENT_CHOICES)
    banks: list[str] = opt(["memory"], "GACD bank(s): each GACD method is trained once per bank (named <method>_<bank> when several)", nargs="+", choices=BANK_CHOICES)
    teacher_head: str = opt("frozen", "GACD teacher embedding head: frozen | train (see distill --help)", choices=TEACHER_HEAD_CHOICES)
    prefill_bank: bool = opt(True, "prefill the GACD bank with the teacher's embeddings of the training set (--no-prefill-bank: off)")
    eps: float | None = opt(None, "L-inf radius for training and evaluation (default: digits 0.2)")
    attack_steps: int | None = opt(None, "PGD steps of the training attacks (default 5 on digits)")
    lr: float | None = opt(None, "SGD learning rate (default 0.05)")
    gacd_weight: float = opt(1.0, "weight of the GACD loss")
    ce_input: str = opt("adv", "GACD's CE term on adv or clean input", choices=("adv", "clean"))
    attack_objective: str = opt("ce", "attack of the gacd / gacd_noweight students: ce (student CE) | guided (GACD's own: maximise the GACD loss against the teacher's clean anchors); gacd_feature always uses guided", choices=("ce", "guided"))
    probe_epochs: int = opt(60, "epochs of the transfer linear probe")
    eps_sweep: int = opt(5, "points of the robust-accuracy-vs-eps plot (PGD-20 at eps 0 .. 1.5 x eps; 0: none)")
    autoattack: int = opt(0, "also run AutoAttack (standard version) on this many test images (0: off; measured: the demo teacher on 100 digits, with FGSM/PGD-20/CW on all 360, evaluated in 15 s on 2 CPU cores)")
    bank_dtype: str = opt("fp32", "dtype of the GACD bank's stored rows: fp32 | bf16", choices=BANK_DTYPE_CHOICES)


@dataclass
class StudyConfig(DemoConfig):
    """study: the demo's recipe over several seeds; mean +- std of every metric (study.json/csv/png)."""

    out_dir: str = opt("runs/study", "output folder (one seed<N>/ run folder per seed, study.json/csv/png)", flag="--out", aliases=("--out-dir",))
    seeds: list[int] = opt([0, 1, 2], "seeds to run (each a whole run: teacher, students, evaluation)", nargs="+")
    methods: list[str] = opt(list(STUDENT_CHOICES), "students to train", nargs="+", choices=STUDENT_CHOICES)
    autoattack: int = opt(200, "AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; torchattacks) at --eps on this many test images per seed, a seeded subset shared by every model of the seed (0: off)")
    eps_sweep: int = opt(0, "points of each run's robust-accuracy-vs-eps plot (0: none)")


# --------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A configuration value of the wrong type, out of range or not among the choices."""


# value ranges checked by validate(): name -> (minimum, strictly greater)
_RANGES: dict[str, tuple[float, bool]] = {
    **{n: (1, False) for n in ("epochs", "batch_size", "train_limit", "test_limit", "threads", "embed_dim",
                                "num_negatives", "teacher_epochs", "student_epochs")},
    **{n: (0, False) for n in ("attack_steps", "pgd_steps", "cw_steps", "probe_epochs", "eps", "alpha", "probe_eps",
                                "weight_decay", "momentum", "eps_sweep", "gacd_weight", "ce_weight", "trades_beta",
                                "ard_alpha", "nce_momentum", "seed", "split_seed", "feature_probe_eps", "autoattack",
                                "rslad_adv_weight", "iad_alpha", "iad_beta", "iad_begin", "adaad_alpha")},
    **{n: (0, True) for n in ("lr", "nce_temperature", "ard_temperature", "iad_temperature")},
}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_value(name: str, value: Any, hint: Any) -> None:
    """Raise ConfigError unless ``value`` fits the annotation ``hint`` (bool, int, float, str,
    list[...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_value(name, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"option {name!r} must be a list of {_type_name(args[0])}, got {value!r} ({type(value).__name__})")
        for v in value:
            _check_value(name, v, args[0])
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        str: lambda v: isinstance(v, str),
    }.get(hint)
    if ok is not None and not ok(value):
        raise ConfigError(f"option {name!r} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def validate(cfg: Any) -> Any:
    """Check every field of ``cfg`` against its type, its choices and its range; returns ``cfg``.
    The error names the option, what was expected and what came."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _check_value(f.name, value, hints[f.name])
        choices = f.metadata.get("choices")
        if choices is not None and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if v not in choices:
                    raise ConfigError(f"option {f.name!r}: unknown value {v!r}; choose from {list(choices)}")
        if f.name in _RANGES and value is not None:
            lo, strict = _RANGES[f.name]
            if value < lo or (strict and value == lo):
                raise ConfigError(f"option {f.name!r} must be {'>' if strict else '>='} {lo}, got {value!r}")
    for name in ("methods", "banks", "seeds"):
        if getattr(cfg, name, None) == []:
            raise ConfigError(f"option {name!r} needs at least one value")
    _check_seeds_and_name(cfg)
    if getattr(cfg, "iad_begin", 0) > 1:
        raise ConfigError(f"option 'iad_begin' is a fraction of the epochs, at most 1, got {cfg.iad_begin!r}")
    try:
        check_teacher_source(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


SEED_MAX = 2**32 - 1  # the data split's seed goes to scikit-learn, which takes 0 .. 2**32 - 1


def _check_seeds_and_name(cfg: Any) -> None:
    """Seeds in 0..SEED_MAX, ``seeds`` without repeats (each is a whole run), ``name`` a plain file
    name (it names files inside --out)."""
    for name in ("seed", "split_seed", "seeds"):
        value = getattr(cfg, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not 0 <= v <= SEED_MAX:
                raise ConfigError(f"option {name!r}: seed {v} is outside 0..{SEED_MAX}")
    seeds = getattr(cfg, "seeds", None) or []
    repeated = sorted({v for v in seeds if seeds.count(v) > 1})
    if repeated:
        raise ConfigError(f"option 'seeds' repeats {repeated}: each seed is one whole run, give each once")
    run_name = getattr(cfg, "name", None)
    if run_name is not None and (run_name in ("", ".", "..") or "\0" in run_name
                                 or any(sep in run_name for sep in ("/", "\\", os.sep, os.altsep or "/"))):
        raise ConfigError(f"option 'name' must be a plain file name (it names <name>.pt inside --out), got {run_name!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@functools.cache
def option_defaults() -> dict[str, Any]:
    """Each option's declared default, over every subcommand's config; an option whose default
    differs between subcommands (``method``, ``out_dir``, ...) is left out. ``--resume`` compares a
    run saved before an option existed as if it had run with this default (the value that keeps an
    option's earlier behaviour)."""
    found: dict[str, Any] = {}
    clashing: set[str] = set()
    for cls in (TeacherConfig, DistillConfig, EvaluateConfig, DemoConfig, StudyConfig):
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in found and found[f.name] != value:
                clashing.add(f.name)
            found.setdefault(f.name, value)
    return {k: v for k, v in found.items() if k not in clashing}


# config-file spellings accepted for a field (the CLI flag names)
KEY_ALIASES = {"out": "out_dir"}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a mapping and validate it; unknown keys are an error naming them."""
    data = {KEY_ALIASES.get(k, k): v for k, v in data.items()}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    return validate(cls(**data))


def load_config(cls: type[T], path: str) -> T:
    """Read a YAML (.yaml/.yml) or JSON file into ``cls``."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of option names to values, got {type(data).__name__}")
    return from_dict(cls, {str(k).replace("-", "_"): v for k, v in data.items()})


def save_config(cfg: Any, path: str) -> None:
    """Write ``cfg`` as YAML (.yaml/.yml) or JSON (atomically)."""
    data = to_dict(cfg)
    if path.endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)


def resolve(cfg: T) -> T:
    """A copy of ``cfg`` (validated) with every None field that has a dataset default filled in."""
    validate(cfg)
    if cfg.dataset not in DATASET_DEFAULTS:  # type: ignore[attr-defined]
        raise ConfigError(f"dataset must be one of {sorted(DATASET_DEFAULTS)}, got {cfg.dataset!r}")  # type: ignore[attr-defined]
    d = DATASET_DEFAULTS[cfg.dataset]  # type: ignore[attr-defined]
    names = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    fills: dict[str, Any] = {}
    for name in ("eps", "alpha", "attack_steps", "batch_size", "epochs", "lr", "momentum", "weight_decay",
                 "num_negatives", "transfer", "ard_kl_reduction", "probe_eps", "feature_probe_eps",
                 "teacher_epochs", "student_epochs"):
        if name in names and getattr(cfg, name) is None and name in d:
            fills[name] = d[name]
    if "kd_kl_reduction" in names and getattr(cfg, "kd_kl_reduction") is None:
        fills["kd_kl_reduction"] = d["ard_kl_reduction"]  # the same reason as ARD's (see DATASET_DEFAULTS)
    if "alpha" in names and getattr(cfg, "alpha") is None:  # the dataset's step, scaled with a given eps
        eps = fills.get("eps", getattr(cfg, "eps", None))
        fills["alpha"] = d["alpha"] if eps is None or eps == d["eps"] else eps / d.get("alpha_div", 4)
    if "model" in names and getattr(cfg, "model") is None:
        fills["model"] = d["teacher_model"]
    if "student" in names and getattr(cfg, "student") is None:
        fills["student"] = d["student_model"]
    return dataclasses.replace(cfg, **fills)
