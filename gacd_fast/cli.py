"""Command line: ``gacd-fast`` / ``python -m gacd_fast`` with the subcommands demo,
train-teacher, distill and evaluate. Every option is a field of the subcommand's config
dataclass (gacd_fast.distill.config); ``--config FILE`` (YAML or JSON) sets any of them, and
options given on the command line win over the file."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import traceback
import typing
from typing import TYPE_CHECKING, Any, Sequence

from .distill import config as C

if TYPE_CHECKING:
    from .distill.train import EpochEndCallback

SUBCOMMANDS: dict[str, tuple[type, str]] = {
    "demo": (C.DemoConfig, "the whole recipe on scikit-learn's digits in a few CPU minutes: adversarially train a "
                           "teacher, train natural / AT / ARD / GACD / GACD-no-weighting / feature-only GACD students, evaluate "
                           "all and say which differences are inside the seed noise (--resume continues an interrupted run)"),
    "study": (C.StudyConfig, "the demo's recipe over several seeds (--seeds 0 1 2) and banks (--banks memory queue batch), "
                             "every registered student by default, AutoAttack on 200 test images per seed: mean +- std "
                             "of every metric and each GACD student's difference to every baseline against the seed "
                             "noise, in study.json/csv/png and comparisons.csv"),
    "train-teacher": (C.TeacherConfig, "adversarially train a teacher (PGD-AT or TRADES); writes <out>/teacher.pt"),
    "distill": (C.DistillConfig, f"train a student ({', '.join(C.STUDENT_CHOICES)}) with the frozen teacher "
                                 "(--teacher, or any model: --teacher-factory); writes <out>/<name>.pt"),
    "evaluate": (C.EvaluateConfig, "clean / FGSM / PGD-20 / CW-inf accuracy, linear CKA and 10-NN agreement to the "
                                   "teacher, same-task and transfer linear probes, robust accuracy vs eps; prints the "
                                   "table, writes results.json/csv/png and plots"),
}


def _scalar_type(hint: Any) -> type:
    """The Python type behind an annotation such as ``int | None`` or ``list[float]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        return args[0]
    if args:
        return _scalar_type(args[0])
    return hint


def flag_of(f: dataclasses.Field) -> str:
    """The command-line option of a config field: --out for out_dir, else --the-name."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or JSON file of options (the names below, "
                        "with _ or -); command-line options override it")
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        text = f.metadata.get("help", "")
        if "default" not in text:
            text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        for key in ("nargs", "choices"):
            if key in f.metadata:
                kw[key] = f.metadata[key]
        typ = _scalar_type(hints[f.name])
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
        if "flag" in f.metadata:
            kw["metavar"] = "DIR"
        parser.add_argument(flag_of(f), **kw)
        for alias in f.metadata.get("aliases", ()):  # old spellings, accepted but not listed
            parser.add_argument(alias, **{**kw, "help": argparse.SUPPRESS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gacd-fast",
        description="Guided adversarial contrastive distillation: train a robust teacher, distill students, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    for name, (cls, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           )
        _add_options(p, cls)
    return parser


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Defaults <- --config file <- options given on the command line."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = C.load_config(cls, args.config) if getattr(args, "config", None) else cls()
    return dataclasses.replace(cfg, **given)


def main(argv: Sequence[str] | None = None, *, callbacks: Sequence[EpochEndCallback] = ()) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit code (0, 1: an
    error in the run, 2: a bad configuration, 130: interrupted). ``callbacks`` are passed to every
    training run (see gacd_fast.distill.train.fit)."""
    args = build_parser().parse_args(argv)
    cls, _ = SUBCOMMANDS[args.command]
    try:
        cfg = C.validate(config_from_args(cls, args))
    except (OSError, ValueError) as e:
        print(f"gacd-fast {args.command}: bad configuration: {e}", file=sys.stderr)
        return 2
    from .distill import parallel, pipeline  # heavy imports only once the arguments are valid

    try:
        if args.command == "demo":
            pipeline.demo(cfg, callbacks=callbacks)
        elif args.command == "study":
            pipeline.study(cfg, callbacks=callbacks)
        elif args.command == "train-teacher":
            pipeline.train_teacher(cfg, callbacks=callbacks)
        elif args.command == "distill":
            pipeline.distill(cfg, callbacks=callbacks)
        else:
            pipeline.evaluate(cfg)
    except (FileNotFoundError, ValueError) as e:  # missing data/checkpoints, bad option values: a clear message
        print(f"gacd-fast {args.command}: error: {e}", file=sys.stderr)
        return _leave(1)
    except OSError as e:  # a file that cannot be written (read-only folder, full disk): one line, no traceback
        print(f"gacd-fast {args.command}: error: {os_error_line(e, cfg.out_dir)}", file=sys.stderr)
        return _leave(1)
    except KeyboardInterrupt:
        print(f"\ngacd-fast {args.command}: interrupted; the per-epoch checkpoints are in {cfg.out_dir}: "
              f"run the same command with --resume to continue", file=sys.stderr)
        return _leave(130)
    except Exception:
        if parallel.initialized():  # under torchrun: report and leave without touching the process group
            traceback.print_exc()
            return _leave(1)
        raise
    parallel.shutdown()  # torchrun: all ranks meet, then leave the process group
    return 0


def os_error_line(e: OSError, out_dir: str) -> str:
    """An OSError of a run as one line: the file, the reason and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    hint = {errno.ENOSPC: f"free some space, or choose another --out (now {out_dir})",
            errno.EDQUOT: f"free some space, or choose another --out (now {out_dir})",
            errno.EROFS: f"choose a writable --out (now {out_dir})",
            errno.EACCES: f"check the permissions, or choose another --out (now {out_dir})",
            errno.EPERM: f"check the permissions, or choose another --out (now {out_dir})"}.get(e.errno or 0)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _leave(code: int) -> int:
    """An error's exit code; under torchrun this rank leaves at once (see parallel.abort)."""
    from .distill import parallel

    if parallel.initialized():
        parallel.abort(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
