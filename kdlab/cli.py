"""The ``kdlab`` console script.

usage: kdlab COMMAND [ARGS...]

  kdlab train [OVERRIDES...]       train + evaluate one run (a Hydra app; -m for sweeps).
                                   Prints its plan first (teacher to train or load, epochs,
                                   schedule) and an estimate of the whole run after epoch 1
  kdlab train --help               config groups and their options
  kdlab eval RUN_DIR_OR_CKPT [key=value ...]
                                   evaluate a trained student without training: the run's
                                   metrics and a reliability diagram, on its own data or
                                   dataset=NAME (kdlab eval --help)
  kdlab report PATH... [--by KEYS] [--metric NAMES] [--out DIR] [--html]
                                   mean +/- std tables and plots over run directories;
                                   --html: one self-contained page
  kdlab methods [--config-dir D]   the distillation methods, one line each
  kdlab data prepare SOURCE OUT    a class-per-folder image tree (ImageNet's train/ or val/)
                                   -> LitData chunks for dataset=streaming (resumable:
                                   run it again after an interruption; kdlab data --help)

examples:
  kdlab train                                  # digits: cnn_small <- cnn, KD
  kdlab train method=alm_kd dataset=cifar100   # resnet8x4 <- resnet32x4 on the CIFAR recipe
  kdlab train -m method=ce,kd seed=0,1,2       # a sweep
  kdlab train -m method=ce,kd seed=0,1,2 resume=true   # continue it after a stop
  sh outputs/2026-11-23/18-25-14-kd/resume.sh  # continue one stopped run
  kdlab eval outputs/2026-11-23/18-25-14-kd dataset=cifar10
  kdlab report multirun/2026-11-23/19-00-00 --html
  python scripts/reproduce_cifar100.py --dry-run   # the README's CIFAR-100 table on a GPU
  kdlab data prepare ~/imagenet/train chunks/train  # then: kdlab train dataset=streaming
                                                    #   dataset.path=chunks/train

Your own methods, models and datamodules: YAMLs with `_target_: my_package.Thing` in a
config directory of yours (method/, student/, teacher/, dataset/ ...), given with
--config-dir DIR (or hydra.searchpath=[file://DIR]); the current directory is importable.
See docs/extending.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import (
    changes_the_experiment,
    check_added_keys,
    compose,
    conf_dir,
    hydra_quoted,
    import_target,
    not_the_experiment,
    use_config_sources,
)
from .errors import ConfigError, KdlabError, hydra_error_line

# Modules that import torch or Lightning (~6 s) are imported inside the functions that need
# them: `kdlab --help`, a bad override and Hydra's own flags answer without that wait.

USAGE = __doc__.split("\n\n", 1)[1]  # from "usage:" on
# Hydra's own flags that take a value, and those that make it do something else than run.
VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn",
               "--experimental-rerun")
OTHER_MODES = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve",
               "--package", "-p", "--shell-completion", "-sc", "--version")
MULTIRUN = ("-m", "--multirun")
log = logging.getLogger("kdlab")


@hydra.main(version_base="1.3", config_path="pkg://kdlab.conf", config_name="train")
def train_app(cfg: DictConfig) -> float:
    from .run_dir import RunDir  # torch, Lightning: see above

    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    use_config_sources(hc.runtime.config_sources)  # group files from the job's search path
    try:
        check_added_keys(cfg, list(hc.overrides.task))
        recorded = RunDir(output_dir).finished_results(cfg)  # resume=true: skip finished runs
        if recorded is not None:
            log.info("already finished: %s, skipped", output_dir)
            return sweep_objective(cfg, recorded)
        check_launcher_strategy(cfg, hc, output_dir)
        print_plan(cfg)
        from .pipeline import run  # torch, Lightning: see above

        results = run(cfg, output_dir)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C (Lightning turns it into exit(1))
        print(f"kdlab: interrupted: {_shown(output_dir)}", file=sys.stderr)
        print(continue_hint(hc, output_dir), file=sys.stderr)
        raise KeyboardInterrupt from None  # a sweep stops here too; main() exits 130
    except Exception as e:
        if not in_sweep:
            fail(e, output_dir)
        # one line per failed job; Hydra records the job as failed and the sweep goes on
        message = f"{_shown(output_dir)}: {error_message(e, output_dir)}"
        print(f"kdlab: error: {message}", file=sys.stderr)
        raise SweepJobFailed(f"kdlab: first failed job: {message}\n"
                             f"{continue_hint(hc, output_dir)}") from None
    return sweep_objective(cfg, results)


def sweep_objective(cfg: DictConfig, results: dict) -> float:
    """What a sweeper (Optuna) optimises: the run's selection metric (``selection.metric``,
    ``val/acc`` by default) at the selected epoch. Set ``hydra.sweeper.direction`` to match
    the metric's direction (``minimize`` for val/nll, val/ece, val/brier)."""
    from .selection import selection_rule

    return float(results["val"][selection_rule(cfg).metric.split("/", 1)[1]])


class SweepJobFailed(CompactHydraException):
    """A sweep job's error, already reported on one line: Hydra prints this message (once,
    for the first failed job, when the sweep ends) instead of a traceback."""


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def continue_hint(hc: DictConfig, output_dir: Path) -> str:
    """How to continue after a failure or an interruption: the sweep's command + resume=true
    (from its multirun.yaml), or the run's own resume.sh."""
    from .run_dir import RESUME_SCRIPT, config_dir_args, kdlab_executable  # see above

    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = f"hydra.sweep.dir={hydra_quoted(str(hc.sweep.dir))}"
        multirun = Path(str(hc.sweep.dir)) / "multirun.yaml"
        if not multirun.is_file():  # a sweeper that writes none (Optuna)
            return ("kdlab: continue the sweep (finished jobs are skipped) with the same "
                    f"command + resume=true {shlex.quote(sweep_dir)}")
        recorded = OmegaConf.load(multirun).hydra.overrides
        args = [kdlab_executable(), "train", "-m", *config_dir_args(hc)]
        args += [o for o in recorded.task if _key(o) != "resume"]
        args += [o for o in recorded.hydra
                 if _key(o) not in ("hydra.mode", "hydra.sweep.dir", EXCLUDE_KEYS)]
        return ("kdlab: continue the sweep (finished jobs are skipped) with: "
                + " ".join(shlex.quote(a) for a in [*args, sweep_dir, "resume=true"]))
    script = output_dir / RESUME_SCRIPT
    if script.is_file() and not (output_dir / "results.json").exists():
        return f"kdlab: continue this run with: sh {shlex.quote(_shown(script))}"
    return "kdlab: continue with the same command + resume=true"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def print_plan(cfg: DictConfig) -> None:
    """What the run will do (teachers, student, epochs, schedule): rank 0, into train.log."""
    from .plan import describe_plan  # torch, Lightning: see above
    from .run_dir import is_launching_process

    if is_launching_process():
        log.info(describe_plan(cfg))


def error_message(error: BaseException, output_dir: Path | None = None) -> str:
    """An error as one line; an unexpected one keeps its traceback in error.log."""
    if isinstance(error, KdlabError):
        return str(error)
    where = ""
    if output_dir is not None and output_dir.is_dir():
        import traceback

        log_file = output_dir / "error.log"
        log_file.write_text("".join(traceback.format_exception(error)))
        where = f"; traceback in {log_file}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"unexpected {type(error).__name__}: {first}{where}"


def fail(error: BaseException, output_dir: Path | None = None) -> None:
    """One line on stderr and exit 1 (and, for a run that started, how to continue it)."""
    print(f"kdlab: error: {error_message(error, output_dir)}", file=sys.stderr)
    if output_dir is not None and (output_dir / "failed.json").is_file():
        hc = HydraConfig.get() if HydraConfig.initialized() else None
        if hc is not None:
            print(continue_hint(hc, output_dir), file=sys.stderr)
    raise SystemExit(1) from None


# -- checks before Hydra creates anything --------------------------------------------------


def split_arguments(args: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """(overrides, extra config dirs, multirun, another Hydra mode such as --help)."""
    overrides, config_dirs = [], []
    multirun = other = False
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in VALUE_FLAGS:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if flag in ("--config-dir", "-cd"):
                config_dirs.append(value)
            elif flag not in ("--config-dir", "-cd"):
                other = True  # another primary config: let Hydra handle it
        elif arg in MULTIRUN:
            multirun = True
        elif arg.startswith("-"):
            other = True
        else:
            overrides.append(arg)
        i += 1
    return overrides, config_dirs, multirun, other


def parsed_overrides(overrides: list[str]) -> list:
    """Hydra's reading of the overrides (key, value, sweep or not); [] if they do not parse
    (Hydra then reports the error itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return []


def given_value(parsed: list, key: str) -> object:
    """The value a (non-sweep) override gives ``key``; None if none does."""
    found = [o for o in parsed if o.key_or_group == key and not o.is_sweep_override()]
    return found[-1].value() if found else None


def check_overrides(args: list[str]) -> None:
    """Compose and validate a single run's config up front, so that bad input fails in one
    line before Hydra writes anything; the run's directory is checked (finished: refused, or
    skipped with resume=true; unfinished: only with resume=true) and its data fetched."""
    overrides, config_dirs, multirun, other = split_arguments(args)
    if multirun or other:
        return  # sweeps: each job is validated before it starts; --help etc.: Hydra's
    from .data import instantiate_datamodule  # torch, Lightning: see above
    from .preflight import validate
    from .run_dir import RunDir, finished_run_error

    parsed = parsed_overrides(overrides)
    run_dir, resume = given_value(parsed, "hydra.run.dir"), given_value(parsed, "resume")
    if run_dir is not None and resume is not True:  # Hydra writes .hydra/ into the run dir
        finished = finished_run_error(Path(str(run_dir)))
        if finished:
            fail(finished)
    try:
        cfg = compose(overrides, config_dirs)
    except KdlabError as e:
        fail(e)
    except Exception as e:
        fail(ConfigError(hydra_error_line(e)))
    try:
        validate(cfg)
        if run_dir is not None:
            directory = RunDir(Path(str(run_dir)))
            if directory.finished_results(cfg) is not None:
                print(f"kdlab: already finished: {run_dir}, skipped")
                raise SystemExit(0)
            refused = directory.refusal(cfg)
            if refused:
                raise refused
        # the data, before there is a run directory: a failed download leaves none
        instantiate_datamodule(cfg).prepare_data()
    except KdlabError as e:
        fail(e)


def resume_sweep(args: list[str]) -> list[str]:
    """``-m ... resume=true`` without hydra.sweep.dir: the arguments + the directory of the
    latest sweep under hydra.sweep.dir's root (multirun/) that ran the same overrides."""
    overrides, config_dirs, multirun, other = split_arguments(args)
    parsed = parsed_overrides(overrides)
    if not multirun or other or given_value(parsed, "resume") is not True or any(
            o.key_or_group == "hydra.sweep.dir" for o in parsed):
        return args
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        template = OmegaConf.to_container(compose(fixed, config_dirs, keep_hydra=True).hydra,
                                          resolve=False)["sweep"]["dir"]
    except Exception:
        return args  # Hydra reports the error when it composes the sweep
    if "${" not in template:
        return args  # one fixed sweep directory: Hydra uses it again
    fixed_part = template[:template.index("${")].rpartition("/")[0]  # multirun
    root = Path(fixed_part or ".")
    depth = template[len(fixed_part):].strip("/").count("/") + 1  # <date>/<time>: 2
    wanted = same_sweep_key(overrides)
    candidates = sorted(root.glob("/".join(["*"] * depth) + "/multirun.yaml"),
                        key=lambda f: (f.stat().st_mtime, str(f)), reverse=True)
    for record in candidates:
        try:
            recorded = list(OmegaConf.load(record).hydra.overrides.task)
        except Exception:
            continue
        if same_sweep_key(recorded) == wanted:
            sweep_dir = record.parent
            print(f"kdlab: resuming the sweep in {sweep_dir} (the latest under {root} with "
                  "these overrides): finished jobs are skipped", file=sys.stderr)
            return [*args, f"hydra.sweep.dir={hydra_quoted(str(sweep_dir))}"]
    fail(ConfigError(f"resume=true: no sweep under {root}/ ran these overrides (resume and "
                     "keys that do not change the experiment aside); name the sweep to "
                     "continue with hydra.sweep.dir=<its directory>"))
    return args


EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def name_swept_keys(args: list[str]) -> list[str]:
    """A sweep over keys that do not change the experiment (``logger=csv,wandb``,
    ``num_threads=1,4``) keeps those keys in its job directory names, which would be the same
    otherwise: the arguments + the exclude list without them."""
    overrides, _, multirun, other = split_arguments(args)
    parsed = parsed_overrides(overrides)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    if not multirun or other or not swept & set(not_the_experiment()) or any(
            o.key_or_group == EXCLUDE_KEYS for o in parsed):
        return args
    keep = [k for k in not_the_experiment() if k not in swept]
    return [*args, f"{EXCLUDE_KEYS}=[{','.join(keep)}]"]


def same_sweep_key(overrides: list[str]) -> set:
    """What makes two sweeps the same: each experiment override's key and its values (in any
    order; resume, logger, threads, paths ... aside)."""
    key = set()
    for o in parsed_overrides(list(overrides)):
        if o.key_or_group.startswith("hydra") or not changes_the_experiment(o.key_or_group):
            continue
        try:
            values = tuple(sorted(o.sweep_string_iterator())) if o.is_sweep_override() \
                else (o.get_value_element_as_str(),)
        except Exception:  # sweeps that cannot be listed (intervals): as written
            values = (o.input_line,)
        key.add((o.get_key_element(), values))
    return key


# Sweep launchers and the multi-process strategies they can host (measured: DESIGN.md).
LAUNCHERS = {"JoblibLauncher": "joblib", "LocalLauncher": "submitit_local"}


def launcher_strategy_error(trainer: DictConfig, hydra_cfg: DictConfig) -> str | None:
    """Why this sweep job's DDP setting cannot run under its launcher (None: it can).

    DDP re-launches the script once per rank, which a joblib worker or a submitit_local job
    cannot do (kdlab does not support ddp_spawn). On SLURM ddp runs one task per device:
    hydra.launcher.tasks_per_node must equal trainer.devices, and hydra.launcher.nodes
    trainer.num_nodes.
    """
    strategy, devices = str(trainer.get("strategy", "auto")), trainer.get("devices", 1)
    multi_process = strategy.startswith(("ddp", "fsdp", "deepspeed")) or (
        strategy == "auto" and isinstance(devices, int) and devices > 1)
    if hydra_cfg.mode != RunMode.MULTIRUN or not multi_process:
        return None
    launcher = str(hydra_cfg.launcher.get("_target_", "")).rsplit(".", 1)[-1]
    if launcher in LAUNCHERS:
        return (f"trainer.strategy={strategy} (devices={devices}) cannot run in a sweep job "
                f"under hydra/launcher={LAUNCHERS[launcher]}. Sweep single-device jobs "
                "(trainer.devices=1 trainer.strategy=auto), or run the DDP job on its own "
                "without -m.")
    tasks = hydra_cfg.launcher.get("tasks_per_node")
    if launcher == "SlurmLauncher" and strategy != "ddp_spawn" and tasks != devices:
        return (f"trainer.strategy={strategy} on SLURM runs one task per device: set "
                f"hydra.launcher.tasks_per_node={devices} and gpus_per_node={devices} "
                f"(now tasks_per_node={tasks}) to match trainer.devices={devices}.")
    nodes, num_nodes = hydra_cfg.launcher.get("nodes", 1), trainer.get("num_nodes", 1)
    if launcher == "SlurmLauncher" and nodes != num_nodes:
        return (f"trainer.num_nodes={num_nodes} but the SLURM job asks for "
                f"hydra.launcher.nodes={nodes}: set both to the same number of nodes.")
    return None


def check_launcher_strategy(cfg: DictConfig, hc: DictConfig, output_dir: Path) -> None:
    """Stop a sweep job whose DDP setting its launcher cannot run, with a clear error."""
    error = launcher_strategy_error(cfg.trainer, hc)
    if error is None:
        return
    from .io import atomic_write_json  # torch: see above

    atomic_write_json(output_dir / "failed.json", {"status": "failed",
                                                   "error": f"ConfigError: {error}"})
    raise ConfigError(error)


# -- kdlab report --------------------------------------------------------------------------


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def report_arguments(argv: list[str], default_metrics: tuple[str, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdlab report",
        description="Tabulate run directories (single runs and multirun trees): mean +/- std "
                    "over seeds for every group of runs that differ only in the seed. Failed and "
                    "unfinished runs are listed, never averaged in. Writes report.md, report.csv "
                    "and report_*.png.",
        epilog="Metrics are dotted paths into results.json: test.acc (the selected "
               "checkpoint), test_last.ece (last epoch), val.nll, mixing.label_weight_noisy, ...; "
               "teacher.X = the first teacher's X or its test.X; a bare name X = test.X.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="run directories or trees of them (multirun sweep dirs)")
    parser.add_argument("--by", type=_comma_list, default=None, metavar="KEYS",
                        help="grouping keys, comma-separated (e.g. method,noise.rate); "
                             "default: method + the overrides that vary, minus seed, resume, "
                             "logger and other keys that do not change the experiment")
    parser.add_argument("--metric", type=_comma_list, default=None,  # None: the defaults
                        metavar="NAMES", help="results.json paths, comma-separated "
                        f"(default: {','.join(default_metrics)})")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where report.md, report.csv and plots go (default: first PATH)")
    parser.add_argument("--html", action="store_true",
                        help="also write report.html: one self-contained page (tables and "
                             "plots inlined) to open in a browser")
    parser.add_argument("--baseline", default=None, metavar="METHOD",
                        help="also show every group's difference from the METHOD group with "
                             "the same other keys (e.g. the same noise.rate), per metric, with "
                             "a 95%% interval over seeds: paired by seed where the two share "
                             "at least two seeds, Welch's unpaired interval otherwise; '*' "
                             "marks intervals that exclude 0. In report.md/.html and as "
                             "<metric>_diff, _diff_lo, _diff_hi, _diff_paired, _diff_n, "
                             "_diff_df columns in report.csv")
    return parser.parse_args(argv)


def report_main(argv: list[str]) -> None:
    """``kdlab report``: the tables and plots of :mod:`kdlab.report` over the run directories
    under the given paths, written as report.md, report.csv, report_*.png (and with --html
    report.html), the markdown printed. Bad input: ``kdlab report: error: ...``, exit 2."""
    from . import report  # pandas and matplotlib only for this command
    from .report_html import render_html

    args = report_arguments(argv, report.DEFAULT_METRICS)
    missing = [p for p in args.paths if not p.is_dir()]
    if missing:
        report_fail(f"not a directory: {missing[0]}")
    runs = report.find_runs(args.paths)
    if not runs:
        report_fail(f"no run directories (with .hydra/config.yaml or config.yaml) under "
                    f"{', '.join(map(str, args.paths))}")
    keys = args.by or report.default_keys(runs)
    out = args.out or args.paths[0]
    try:
        report.check_keys(runs, keys)
        if args.baseline is not None:
            report.check_baseline(runs, keys, args.baseline)
        out.mkdir(parents=True, exist_ok=True)
        built = report.build_report(runs, keys, args.metric, out, args.paths, args.baseline)
    except report.ReportError as e:
        report_fail(str(e))
    text = built.markdown()
    (out / "report.md").write_text(text)
    built.summary.to_csv(out / "report.csv", index=False)
    written = [out / "report.md", out / "report.csv"]
    if args.html:
        (out / "report.html").write_text(render_html(built), encoding="utf-8")
        written.append(out / "report.html")
    print(text)
    print(f"wrote {', '.join(map(str, written))}")


def report_fail(message: str) -> None:
    print(f"kdlab report: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- kdlab data ----------------------------------------------------------------------------


def data_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdlab data", description="Prepare datasets beyond memory for dataset=streaming.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare", help="a class-per-folder image tree -> LitData chunks",
        description="Convert a class-per-folder image tree (SOURCE/<class>/<image>: ImageNet's "
                    "train/ and val/ folders, Tiny-ImageNet's train/) into LitData chunks in "
                    "OUT, for `kdlab train dataset=streaming dataset.path=OUT` (OUT, or OUT "
                    "uploaded whole to an object store: dataset.path=s3://...). Every image's "
                    "header is checked first; images are stored as they are (PNG and CMYK "
                    "JPEG re-encoded as RGB JPEG). Interrupted, the same command continues "
                    "from the last finished chunk; OUT/kdlab.json, written last, records the "
                    "format version, the classes and every example's id, label and file.",
        epilog="example: kdlab data prepare ~/data/imagenet/train chunks/imagenet-train && "
               "kdlab data prepare ~/data/imagenet/val chunks/imagenet-val")
    prepare.add_argument("source", type=Path, metavar="SOURCE",
                         help="the tree: one folder of images per class")
    prepare.add_argument("out", type=Path, metavar="OUT",
                         help="where the chunks go: a new or empty directory, or an "
                              "interrupted prepare of SOURCE to continue")
    prepare.add_argument("--workers", type=int, default=None, metavar="N",
                         help="processes writing chunks (default: min(8, CPUs)); a continued "
                              "prepare keeps the number it started with")
    prepare.add_argument("--chunk-bytes", default="64MB", metavar="SIZE",
                         help="largest chunk (default 64MB, LitData's advice for object "
                              "stores)")
    return parser.parse_args(argv)


def data_main(argv: list[str]) -> None:
    """``kdlab data prepare SOURCE OUT``: :func:`kdlab.data.prepare.prepare`; bad input is
    one ``kdlab: error:`` line and exit 1."""
    args = data_arguments(argv)
    if args.workers is not None and args.workers < 1:
        fail(ConfigError(f"--workers must be >= 1, got {args.workers}"))
    from .data.prepare import prepare  # torch: see above
    from .data.streaming import require_litdata

    try:
        require_litdata("kdlab data prepare")
        manifest = prepare(args.source, args.out, args.workers, args.chunk_bytes)
    except KeyboardInterrupt:
        print(f"kdlab: interrupted: run the same command again to continue the prepare in "
              f"{args.out}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        fail(e)
    print(f"prepared {manifest['num_examples']} images of {len(manifest['classes'])} classes "
          f"into {args.out} ({manifest['num_chunks']} chunks); train on them with: kdlab train "
          f"dataset=streaming dataset.path={shlex.quote(str(args.out))}")


# -- kdlab methods -------------------------------------------------------------------------


def list_methods(config_dirs: list[str] = ()) -> str:
    """Every method config (kdlab's and those in ``config_dirs``) with its description."""
    found: dict[str, Path] = {}
    for root in [conf_dir(), *map(Path, config_dirs)]:
        for path in sorted((root / "method").glob("*.yaml")):
            found[path.stem] = path  # a user's config of the same name wins, as in Hydra
    lines, width = [], max(map(len, found), default=0)
    for name, path in sorted(found.items()):
        config = OmegaConf.load(path)
        target = str(config.get("_target_", ""))
        try:
            description = import_target(target, f"method {name}").describe(config)
        except KdlabError as e:
            description = f"(cannot import: {e})"
        origin = "" if path.parent.parent == conf_dir() else f"  [{path}]"
        lines.append(f"  {name:<{width}}  {description}{origin}")
    return "methods (kdlab train method=NAME):\n" + "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: your package in . imports
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "methods":
        _, config_dirs, _, _ = split_arguments(rest)
        print(list_methods(config_dirs))
        return
    if command == "report":
        report_main(rest)
        return
    if command == "data":
        data_main(rest)
        return
    if command == "eval":
        from .evaluate import main as eval_main

        eval_main(rest)
        return
    if command != "train":
        if "=" in command or command.startswith("-"):
            rest = args  # `kdlab key=value ...` (how DDP re-launches ranks) means train
        else:
            print(f"kdlab: error: unknown command {command!r}; commands: train, eval, report, "
                  "methods, data", file=sys.stderr)
            raise SystemExit(2)
    try:
        check_overrides(rest)
        sys.argv = [sys.argv[0], *name_swept_keys(resume_sweep(rest))]
        train_app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # what was interrupted, and how to continue: above
    finally:
        use_config_sources(())  # the command's config directories end with it (in-process)


if __name__ == "__main__":
    main()
