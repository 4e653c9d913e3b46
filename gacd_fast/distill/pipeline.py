"""The subcommands as functions: train a teacher, distill a student, evaluate checkpoints, demo.

Each takes a config dataclass, validates it and resolves the dataset defaults, writes the resolved
config (config.json and config.yaml) to its out dir, and returns what it produced. Training writes
``<name>.state.pt`` after every epoch and ``<name>.pt`` at the end (both atomically); with
``resume=True`` a finished ``<name>.pt`` is reused and an unfinished model continues from its
state file, ending with the same numbers as an uninterrupted run.

Under torchrun (WORLD_SIZE > 1) training runs on every rank (see :mod:`.parallel`); rank 0 alone
writes configs, logs, checkpoints and results, and evaluation runs on rank 0 alone, after the
process group is closed (the other ranks return at once: they have nothing to wait for).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import torch

from .config import (
    DemoConfig,
    StudyConfig,
    DistillConfig,
    EvaluateConfig,
    TeacherConfig,
    resolve,
    save_config,
    to_dict,
)
from .data import DataBundle, load_dataset, load_transfer
from .evaluate import eps_grid, eps_sweep, evaluate_models
from .external_teacher import OPTIONS as EXTERNAL_TEACHER_OPTIONS, build_external_teacher
from .method_registry import STUDENT_METHODS, build_method
from .methods import AttackSpec, MethodInputs
from . import parallel, runs
from .models import build_model
from .report import format_table, write_results
from .study import compare, format_comparisons, format_summary, noise_report, summarize, write_study
from .. import _precision
from .train import (TEACHER_HASH_KEY, EpochEndCallback, Logger, Speed, check_resumable, config_mismatch, fit,
                    load_checkpoint, pick_device, save_checkpoint)


def _locked(command: str):
    """A subcommand holds the lock of its --out folder while it runs (rank 0 alone under torchrun,
    the only rank that writes); see :func:`.runs.locked`."""
    return runs.locking(lambda cfg, *a, **k: cfg.out_dir, f"gacd-fast {command}", enabled=parallel.is_main)


def _check_resume_files(files: Sequence[str], config: dict[str, Any]) -> None:
    """--resume: each of ``files`` that exists (a finished checkpoint, a state file) must have been
    written with ``config`` (RunError otherwise), checked before any config file is rewritten."""
    for path in files:
        if os.path.isfile(path):
            saved = runs.read_torch_file(path, "gacd-fast checkpoint or state file",
                                         "delete it to start this model over, or run without --resume", mmap=True)
            check_resumable(path, saved.get("config"), config)


def _setup(cfg: Any, config_name: str = "config", distributed: bool = True, *, resume_files: Sequence[str] = (),
           run_config: dict[str, Any] | None = None, write_config: bool = True) -> tuple[torch.device, Logger]:
    """Threads, determinism, seed, config files; under torchrun (``distributed``) the process
    group and this rank's device. Only rank 0 writes and logs. With --resume the files
    ``resume_files`` are checked against ``run_config`` first, so that a refused resume rewrites
    no config file."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # cuBLAS needs this before its first use to be deterministic (torch's reproducibility notes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = parallel.setup(cfg.device) if distributed else pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    main = parallel.is_main()
    if main:
        runs.make_out_dir(cfg.out_dir)
        if cfg.resume and resume_files:
            _check_resume_files(resume_files, run_config if run_config is not None else to_dict(cfg))
        if write_config:
            _write_config(cfg, config_name)
    return device, Logger(cfg.out_dir if main else None, quiet=not main)


def _write_config(cfg: Any, config_name: str) -> None:
    save_config(cfg, os.path.join(cfg.out_dir, f"{config_name}.json"))
    save_config(cfg, os.path.join(cfg.out_dir, f"{config_name}.yaml"))


def split_seed(cfg: Any) -> int:
    """The seed of the train/test split: --split-seed, else --seed."""
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def _data(cfg: Any) -> DataBundle:
    s = split_seed(cfg)
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=s)
    for split, part in (("training", data.train), ("test", data.test)):
        if len(part) == 0:
            raise runs.RunError(f"{cfg.dataset}: the {split} split holds no images"
                                + (f" (files in --data-dir {cfg.data_dir})" if cfg.data_dir else "")
                                + ": check the data files")
    return DataBundle(data.train.subset(cfg.train_limit, s), data.test.subset(cfg.test_limit, s), data.augment)


def _with_teacher_split(cfg: DemoConfig) -> DemoConfig:
    """With a reused --teacher and no --split-seed: the teacher's split (from its checkpoint), so that
    no run evaluates on images the teacher trained on."""
    if not cfg.teacher or cfg.split_seed is not None:
        return cfg
    if not os.path.isfile(cfg.teacher):
        raise FileNotFoundError(f"teacher checkpoint not found: {cfg.teacher}")
    meta = runs.read_torch_file(cfg.teacher, "gacd-fast model checkpoint",
                                "pass a teacher checkpoint written by `gacd-fast train-teacher`").get("config") or {}
    if not isinstance(meta, dict) or "seed" not in meta:
        raise ValueError(f"{cfg.teacher} does not say which split it was trained on; pass --split-seed")
    return dataclasses.replace(cfg, split_seed=meta.get("split_seed") if meta.get("split_seed") is not None else meta["seed"])


def _external_teacher(cfg: DistillConfig | EvaluateConfig, data: DataBundle, device: torch.device) -> torch.nn.Module:
    """The --teacher-factory teacher, checked on the first training images of ``data``."""
    example = data.train.batch(torch.arange(min(8, len(data.train))))
    return build_external_teacher(cfg, example, data.train.num_classes, device)


def _finished(path: str, cfg: Any, log: Logger, name: str, config: dict[str, Any] | None = None) -> bool:
    """With --resume: True when ``path`` holds this model, trained with the same configuration
    (``config``, default the config of ``cfg``)."""
    if not (cfg.resume and os.path.isfile(path)):
        return False
    meta = runs.read_torch_file(path, "gacd-fast model checkpoint", "delete it to train it again, or run without --resume",
                                mmap=True)
    check_resumable(path, meta.get("config"), to_dict(cfg) if config is None else config)
    log(f"[{name}] --resume: {path} is finished, not retrained")
    return True


def _finish(path: str, state_path: str, model: torch.nn.Module, log: Logger, name: str, **meta: Any) -> None:
    if parallel.is_main():
        save_checkpoint(path, model, **meta)
        if os.path.isfile(state_path):
            os.remove(state_path)  # the final checkpoint supersedes the per-epoch state
        log(f"[{name}] saved {path}")
    parallel.barrier()  # the other ranks may read the checkpoint next (the demo's students load the teacher)


def _attack(cfg: TeacherConfig | DistillConfig) -> AttackSpec:
    """The training attack of a resolved config."""
    return AttackSpec(cfg.eps, cfg.alpha, cfg.attack_steps)


@_locked("train-teacher")
def train_teacher(cfg: TeacherConfig, log: Logger | None = None, *, callbacks: Sequence[EpochEndCallback] = ()) -> str:
    """Adversarially train the teacher; returns the checkpoint path (<out_dir>/teacher.pt).
    ``callbacks``: passed to :func:`.train.fit`."""
    cfg = resolve(cfg)
    path, state_path = (os.path.join(cfg.out_dir, f"teacher{ext}") for ext in (".pt", ".state.pt"))
    device, own_log = _setup(cfg, "teacher_config", resume_files=(path, state_path))
    log = log or own_log
    if _finished(path, cfg, log, "teacher"):
        return path
    data = _data(cfg)
    c, _, _ = data.train.image_shape
    model = build_model(cfg.model, data.train.num_classes, c)
    method = build_method("teacher", cfg.method, cfg, MethodInputs(_attack(cfg)))
    log(f"[teacher] {cfg.model} by {cfg.method} on {cfg.dataset} ({len(data.train)} train / {len(data.test)} test), "
        f"eps {cfg.eps:.4g}, PGD-{cfg.attack_steps} step {cfg.alpha:.4g}, device {device}")
    history = fit(model, method, data.train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                  momentum=cfg.momentum, weight_decay=cfg.weight_decay, lr_milestones=cfg.lr_milestones,
                  augment=data.augment, device=device, seed=cfg.seed, test=data.test, log=log, tag="teacher",
                  progress=cfg.progress, state_path=state_path, resume=cfg.resume, config=to_dict(cfg),
                  deterministic=cfg.deterministic, callbacks=callbacks, speed=Speed.of(cfg))
    _finish(path, state_path, model, log, "teacher", arch=cfg.model, num_classes=data.train.num_classes,
            in_channels=c, role="teacher", method=cfg.method, config=to_dict(cfg), history=history)
    return path


@_locked("distill")
def distill(cfg: DistillConfig, log: Logger | None = None, *, callbacks: Sequence[EpochEndCallback] = ()) -> str:
    """Train one student (a method of the student registry); returns its checkpoint path.
    ``callbacks``: passed to :func:`.train.fit`. The run's config records the teacher's content hash
    (``teacher_sha256``): --resume refuses another teacher."""
    cfg = resolve(cfg)
    name = cfg.name or cfg.method
    path, state_path = (os.path.join(cfg.out_dir, f"{name}{ext}") for ext in (".pt", ".state.pt"))
    needs_teacher = STUDENT_METHODS[cfg.method].needs_teacher
    if needs_teacher and not (cfg.teacher or cfg.teacher_factory):
        raise ValueError(f"method {cfg.method!r} needs --teacher, a checkpoint from `gacd-fast train-teacher` "
                         "(or --teacher-factory module:function)")
    run_config = to_dict(cfg)
    if needs_teacher and cfg.teacher and not os.path.isfile(cfg.teacher):
        raise FileNotFoundError(f"teacher checkpoint not found: {cfg.teacher}")
    teacher_file = cfg.teacher or cfg.teacher_weights  # what --resume must find unchanged
    if needs_teacher and teacher_file and os.path.isfile(teacher_file):  # a missing --teacher-weights: said below
        run_config[TEACHER_HASH_KEY] = runs.file_sha256(teacher_file)
    device, own_log = _setup(cfg, f"{name}_config", resume_files=(path, state_path), run_config=run_config)
    log = log or own_log
    if _finished(path, cfg, log, name, run_config):
        return path
    teacher = teacher_meta = None
    if needs_teacher and cfg.teacher:
        teacher, teacher_meta = load_checkpoint(cfg.teacher, device)
    data = _data(cfg)
    if needs_teacher and teacher is None:
        teacher = _external_teacher(cfg, data, device)
    if teacher is not None:
        Speed.of(cfg).model(teacher)
    c, _, _ = data.train.image_shape
    runs.check_teacher_fits(cfg.teacher, teacher_meta, cfg.dataset, data.train.num_classes, c)
    model = build_model(cfg.student, data.train.num_classes, c)
    inputs = MethodInputs(_attack(cfg), teacher, getattr(model, "feature_dim", None), len(data.train))
    method = build_method("student", cfg.method, cfg, inputs)
    log(f"[{name}] {cfg.student} by {cfg.method} on {cfg.dataset}, eps {cfg.eps:.4g}, PGD-{cfg.attack_steps}, device {device}")
    history = fit(model, method, data.train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                  momentum=cfg.momentum, weight_decay=cfg.weight_decay, lr_milestones=cfg.lr_milestones,
                  augment=data.augment, device=device, seed=cfg.seed, test=data.test, log=log, tag=name,
                  progress=cfg.progress, state_path=state_path, resume=cfg.resume, config=run_config,
                  deterministic=cfg.deterministic, callbacks=callbacks, speed=Speed.of(cfg))
    _finish(path, state_path, model, log, name, arch=cfg.student, num_classes=data.train.num_classes, in_channels=c,
            role="student", method=cfg.method, config=run_config, history=history)
    return path


@_locked("evaluate")
def evaluate(cfg: EvaluateConfig, log: Logger | None = None, title: str = "",
             run_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Evaluate the teacher (if given) and the checkpoints; print the table, write results.json/csv/png,
    curves.json, robust_vs_eps.png and training_curves.png. results.json's "config" is this
    evaluation's config, or ``run_config`` (the demo's) with it under "evaluation"."""
    asked_transfer = cfg.transfer
    cfg = resolve(cfg)
    if not parallel.is_main():
        return []  # under torchrun rank 0 evaluates alone
    transfer_dir = cfg.transfer_data_dir or cfg.data_dir
    if asked_transfer is None and cfg.transfer == "stl10" and not cfg.transfer_data_dir:
        cfg = dataclasses.replace(cfg, transfer="none")  # CIFAR: the STL-10 probe by default only when its files are given
    device, own_log = _setup(cfg, "evaluate_config", distributed=False)
    log = log or own_log
    if not cfg.teacher and not cfg.teacher_factory and not cfg.checkpoints:
        raise ValueError("nothing to evaluate: give --teacher (or --teacher-factory) and/or --checkpoints")
    inputs = _evaluation_inputs(cfg)
    done = _finished_evaluation(cfg, inputs, nested=run_config is not None)
    if done is not None:
        log(f"[eval] --resume: {os.path.join(cfg.out_dir, 'results.json')} holds this evaluation of these "
            f"{len(done)} model files (same content, same options): not evaluated again")
        log(format_table(done, (title or cfg.dataset) + f": eps {cfg.eps:.4g}"))
        return done
    data = _data(cfg)
    models: dict[str, torch.nn.Module] = {}
    metas: dict[str, dict[str, Any]] = {}
    teacher = None
    c = data.test.image_shape[0]
    if cfg.teacher:
        teacher, metas["teacher"] = load_checkpoint(cfg.teacher, device)
        runs.check_teacher_fits(cfg.teacher, metas["teacher"], cfg.dataset, data.test.num_classes, c, same_dataset=False)
        models["teacher"] = teacher
    elif cfg.teacher_factory:
        teacher, metas["teacher"] = _external_teacher(cfg, data, device), {"teacher_factory": cfg.teacher_factory}
        models["teacher"] = teacher
    for key, path in _checkpoint_names(cfg).items():
        models[key], metas[key] = load_checkpoint(path, device)
        runs.check_teacher_fits(path, metas[key], cfg.dataset, data.test.num_classes, c, option="--checkpoints",
                                same_dataset=False)
    speed = Speed.of(cfg)
    speed.check(device)
    for m in models.values():
        speed.model(m)
    transfer = load_transfer(cfg.transfer, transfer_dir, seed=split_seed(cfg))
    log(f"[eval] {len(models)} model(s) on {cfg.dataset} test ({len(data.test)}), eps {cfg.eps:.4g}, "
        f"PGD-{cfg.pgd_steps}/CW-{cfg.cw_steps} step {cfg.alpha:.4g}, "
        + (f"same-task probe PGD eps {cfg.feature_probe_eps:.4g}, " if cfg.feature_probe else "")
        + f"transfer {cfg.transfer} (probe PGD eps {cfg.probe_eps:.4g})")
    batch_size = max(cfg.batch_size, 256)
    with _precision.autocast(cfg.eval_precision, device):  # every attack and probe inherits the region
        rows = evaluate_models(models, data.test, teacher=teacher, eps=cfg.eps, alpha=cfg.alpha, pgd_steps=cfg.pgd_steps,
                           cw_steps=cfg.cw_steps, transfer=transfer, probe_epochs=cfg.probe_epochs, probe_eps=cfg.probe_eps,
                           probe_train=data.train if cfg.feature_probe else None, feature_probe_eps=cfg.feature_probe_eps,
                           autoattack=cfg.autoattack,
                           batch_size=batch_size, device=device, seed=cfg.seed, log=log, progress=cfg.progress)
    for row in rows:
        row["seconds"] = metas[row["model"]].get("seconds")
        # how the model was trained (checkpoints from before precision= were fp32) and evaluated
        row["precision"] = (metas[row["model"]].get("config") or {}).get("precision", "fp32")
        row["eval_precision"] = cfg.eval_precision
    sweep = None
    if cfg.eps_sweep:
        grid = eps_grid(cfg.eps, cfg.eps_sweep)
        t0 = time.time()
        with _precision.autocast(cfg.eval_precision, device):
            acc = eps_sweep(models, data.test, grid, steps=cfg.pgd_steps, batch_size=batch_size, device=device,
                            seed=cfg.seed, progress=cfg.progress)
        sweep = {"eps": grid, "attack": f"pgd{cfg.pgd_steps}", "train_eps": cfg.eps, "accuracy": acc}
        log(f"[eval] PGD-{cfg.pgd_steps} accuracy at eps {', '.join(f'{e:.3g}' for e in grid)} ({time.time() - t0:.1f}s):")
        for name, accs in acc.items():
            log(f"[eval]   {name}: " + " ".join(f"{100 * a:.1f}" for a in accs))
    title = title or cfg.dataset
    probes = [f"probe PGD-{cfg.pgd_steps} at eps {cfg.feature_probe_eps:.4g}"] if cfg.feature_probe else []
    if cfg.transfer != "none":
        probes.append(f"transfer probe on {cfg.transfer}, PGD-{cfg.pgd_steps} at eps {cfg.probe_eps:.4g}")
    table = format_table(rows, title + f": eps {cfg.eps:.4g}" + "".join(f"; {p}" for p in probes))
    log(table)
    paths = write_results(rows, cfg.out_dir, dataset=cfg.dataset, eps=cfg.eps, device=str(device), config={**run_config, "evaluation": to_dict(cfg)} if run_config else to_dict(cfg),
                          title=title, sweep=sweep, histories={k: m.get("history", []) for k, m in metas.items()},
                          chance={k: c for k, m in metas.items() if (c := gacd_chance(m.get("config") or {})) is not None},
                          inputs=inputs)
    log(f"[eval] wrote {', '.join(paths.values())}")
    return rows


def _checkpoint_names(cfg: EvaluateConfig) -> dict[str, str]:
    """Each of --checkpoints by its name in the results: the file name without its extension, or the
    whole path where that name is taken (by the teacher or an earlier checkpoint)."""
    names: dict[str, str] = {}
    taken = {"teacher"} if cfg.teacher or cfg.teacher_factory else set()
    for path in cfg.checkpoints:
        key = os.path.splitext(os.path.basename(path))[0]
        key = path if key in taken or key in names else key
        names[key] = path
    return names


def _evaluation_inputs(cfg: EvaluateConfig) -> dict[str, str]:
    """Model name (as in the results) -> the content hash of the file it is read from: the teacher
    checkpoint (or --teacher-weights) and each checkpoint."""
    files = {"teacher": cfg.teacher or cfg.teacher_weights, **_checkpoint_names(cfg)}
    return {name: runs.file_sha256(path) for name, path in files.items() if path and os.path.isfile(path)}


def _finished_evaluation(cfg: EvaluateConfig, inputs: dict[str, str], *, nested: bool) -> list[dict[str, Any]] | None:
    """With --resume: the rows of ``<out>/results.json`` when it was written by an evaluation of the
    same files (``inputs``) with the same options (``nested``: under a demo's or study's config, in
    its "evaluation" key), so that an interrupted study does not run its attacks again; else None."""
    path = os.path.join(cfg.out_dir, "results.json")
    if not (cfg.resume and inputs and os.path.isfile(path)):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        saved = doc["config"]["evaluation"] if nested else doc["config"]
        if doc.get("inputs") != inputs or set(doc["methods"]) != set(inputs) or config_mismatch(saved, to_dict(cfg)):
            return None
        return [{"model": name, **row} for name, row in doc["methods"].items()]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or from an older gacd-fast: evaluate again


def gacd_chance(config: dict[str, Any]) -> float | None:
    """log(K+1) for a GACD student's run config (K negatives per sample; batch bank: batch - 1), else None."""
    info = STUDENT_METHODS.get(str(config.get("method", "")))
    if info is None or not info.uses_bank:
        return None
    k = config["batch_size"] - 1 if config.get("bank") == "batch" else config.get("num_negatives")
    return math.log(k + 1) if k else None


def student_runs(methods: list[str], banks: list[str]) -> list[tuple[str, str, str]]:
    """(run name, method, bank) per student: every method that uses a bank once per bank (named
    ``<method>_<bank>`` when there are several banks), the others once."""
    runs = []
    for m in methods:
        if STUDENT_METHODS[m].uses_bank and len(banks) > 1:
            runs += [(f"{m}_{b}", m, b) for b in banks]
        else:
            runs.append((m, m, banks[0]))
    return runs


def recipe(cfg: DemoConfig, log: Logger, title: str, callbacks: Sequence[EpochEndCallback] = ()) -> list[dict[str, Any]]:
    """Train the teacher and every student of ``cfg`` into ``cfg.out_dir`` (``callbacks`` passed to
    every :func:`.train.fit`), evaluate them all; the evaluation's rows (empty on ranks other than 0)."""
    common = dict(dataset=cfg.dataset, data_dir=cfg.data_dir, out_dir=cfg.out_dir, seed=cfg.seed, split_seed=cfg.split_seed,
                  device=cfg.device,
                  batch_size=cfg.batch_size, train_limit=cfg.train_limit, test_limit=cfg.test_limit,
                  threads=cfg.threads, resume=cfg.resume, progress=cfg.progress, deterministic=cfg.deterministic,
                  eps=cfg.eps, attack_steps=cfg.attack_steps, lr=cfg.lr, precision=cfg.precision,
                  eval_precision=cfg.eval_precision, channels_last=cfg.channels_last, compile=cfg.compile)
    external = {o: getattr(cfg, o) for o in EXTERNAL_TEACHER_OPTIONS}  # --teacher-factory: no teacher to train
    teacher_path = cfg.teacher or (None if cfg.teacher_factory else train_teacher(
        TeacherConfig(**common, method=cfg.teacher_method, epochs=cfg.teacher_epochs), log, callbacks=callbacks))
    paths = []
    for name, method, bank in student_runs(cfg.methods, cfg.banks):
        paths.append(distill(DistillConfig(**common, **external, teacher=teacher_path, method=method, name=name, bank=bank,
                                           teacher_head=cfg.teacher_head, prefill_bank=cfg.prefill_bank,
                                           epochs=cfg.student_epochs, gacd_weight=cfg.gacd_weight,
                                           ce_input=cfg.ce_input, attack_objective=cfg.attack_objective,
                                           bank_dtype=cfg.bank_dtype), log,
                             callbacks=callbacks))
    ecfg = EvaluateConfig(**{k: v for k, v in common.items() if k not in ("attack_steps", "lr", "precision", "compile")},
                          **external,
                          teacher=teacher_path, checkpoints=paths, probe_epochs=cfg.probe_epochs,
                          eps_sweep=cfg.eps_sweep, autoattack=cfg.autoattack)
    parallel.shutdown()  # training is over: rank 0 evaluates alone, the other ranks are done
    if not parallel.is_main():
        return []
    return evaluate(ecfg, log, title=title, run_config=to_dict(cfg))


@_locked("demo")
def demo(cfg: DemoConfig, *, callbacks: Sequence[EpochEndCallback] = ()) -> list[dict[str, Any]]:
    """Adversarially train a teacher, then every student, evaluate all, print the table (and
    which differences are inside the seed noise). ``callbacks``: passed to every :func:`.train.fit`.
    With --resume, demo_config.json/yaml are rewritten only once every model's resume check passed."""
    t_start = time.time()
    cfg = _with_teacher_split(resolve(cfg))
    device, log = _setup(cfg, "demo_config", write_config=not cfg.resume)
    rows = recipe(cfg, log, title=f"GACD demo on {cfg.dataset}", callbacks=callbacks)
    if cfg.resume and parallel.is_main():
        _write_config(cfg, "demo_config")
    if rows:
        probe_only = tuple(name for name, method, _ in student_runs(cfg.methods, cfg.banks)
                           if STUDENT_METHODS[method].probe_only)
        log(noise_report(rows, cfg.dataset, probe_only=probe_only))
        log(f"[demo] total wall time {time.time() - t_start:.1f}s; results in {cfg.out_dir}")
    return rows


@_locked("study")
def study(cfg: StudyConfig, *, callbacks: Sequence[EpochEndCallback] = ()) -> dict[str, Any]:
    """The demo's recipe once per seed (``<out>/seed<N>/``), then mean +- std over the seeds of
    every metric: study.json, study.csv, study.png and the printed table (one process only).
    ``callbacks``: passed to every :func:`.train.fit`."""
    t_start = time.time()
    cfg = _with_teacher_split(resolve(cfg))
    if parallel.launched():
        raise ValueError("gacd-fast study runs in one process (it repeats whole runs per seed); run it without torchrun")
    _, log = _setup(cfg, "study_config", distributed=False, write_config=not cfg.resume)
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in cfg.seeds:
        run = dataclasses.replace(cfg, seed=seed, out_dir=os.path.join(cfg.out_dir, f"seed{seed}"))
        log(f"[study] seed {seed} ({cfg.seeds.index(seed) + 1}/{len(cfg.seeds)}) -> {run.out_dir}")
        with runs.locked(run.out_dir, "gacd-fast study"):
            per_seed[seed] = recipe(run, Logger(run.out_dir), title=f"{cfg.dataset} seed {seed}", callbacks=callbacks)
    if cfg.resume:
        _write_config(cfg, "study_config")
    summary = summarize(per_seed)
    students = student_runs(cfg.methods, cfg.banks)  # GACD (the students with a bank) against every baseline
    comparisons = compare(per_seed, [n for n, m, _ in students if STUDENT_METHODS[m].uses_bank],
                          ["teacher"] + [n for n, m, _ in students if not STUDENT_METHODS[m].uses_bank],
                          probe_only=tuple(n for n, m, _ in students if STUDENT_METHODS[m].probe_only))
    paths = write_study(summary, per_seed, cfg.out_dir, config=to_dict(cfg), title=f"{cfg.dataset}: {len(cfg.seeds)} seeds",
                        comparisons=comparisons)
    log(format_summary(summary, f"{cfg.dataset}: mean +- std over seeds {cfg.seeds}"))
    log(format_comparisons(comparisons, "differences to each baseline, paired by seed: mean ± 95% half-width "
                                        "(t, n-1 df); OUTSIDE = beyond the seed noise"))
    log(f"[study] wrote {', '.join(paths.values())}; total wall time {time.time() - t_start:.1f}s")
    return summary
