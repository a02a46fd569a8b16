"""``kdlab eval RUN_DIR_OR_CKPT [key=value ...]``: evaluate a trained student, no training.

The student comes from a run directory (its ``checkpoints/best.ckpt``, or ``last`` with
``checkpoint=last``, and its ``config.yaml``) or from any checkpoint ``kdlab train`` wrote:
the checkpoint's saved hyperparameters rebuild the student, and only the student's weights
are read (no teacher; the method is rebuilt from its configuration for its prediction,
``Method.predict``: mixup KD's s / std(s)). The data is the run's own dataset unless
``dataset=NAME`` names another (``dataset.*``, ``noise=``/``noise.*``, ``seed=`` and
``paths.*`` adjust it as in ``kdlab train``). The metrics are the training run's own
(``kdlab.metrics``: accuracy, top-5, ECE with 15 bins, NLL, Brier), computed as a run's test
step computes them (:mod:`kdlab.evaluation`), in the run's precision unless ``precision=``
says otherwise, so a run evaluated on its own test split gives its results.json ``test``
numbers.

The labels scored against are the split's own: on a train split with label noise, the
noisy labels (the student's training labels when the noise is the run's); ``labels=clean``
scores against the clean labels of the same examples instead. The printout, the diagram's
title and eval.json (``labels``) say which.

Writes ``eval.json`` and ``reliability.png`` into ``out=DIR`` (default
``<run dir>/eval-<dataset>``; ``-<split>``, ``-clean`` and ``-<checkpoint>`` are added when
they are not ``test``, ``given`` and ``best``) and prints a small table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import KdlabError, hydra_error_line

USAGE = """usage: kdlab eval RUN_DIR_OR_CKPT [key=value ...]

Evaluate a trained student on a dataset split, without training: the same metrics as a run
(accuracy, top-5, ECE, NLL, Brier) and a reliability diagram, into eval.json and
reliability.png.

  RUN_DIR_OR_CKPT     a run directory (uses checkpoints/best.ckpt and its config.yaml) or
                      any checkpoint written by kdlab train
  dataset=NAME        another dataset (default: the run's own; required for a checkpoint
                      outside a run directory); dataset.KEY=VALUE adjusts it
  noise=NAME, noise.rate=R, seed=S, paths.data_dir=DIR    as in kdlab train (label noise
                      only changes the train split)
  split=test          test | val | meta | train
  labels=given        given: the split's labels (on a noisy train split: the noisy labels,
                      the student's training labels) | clean: the labels before the noise
  checkpoint=best     best | last (for a run directory)
  precision=P         default: the run's precision (results.json), else 32-true
  accelerator=A       auto (default) | cpu | gpu
  out=DIR             default: <run dir>/eval-<dataset>[-<split>][-clean][-<checkpoint>];
                      for a checkpoint outside a run directory, next to it:
                      eval-<dataset>[-<split>][-clean]-<checkpoint file name>

examples:
  kdlab eval outputs/2026-11-23/18-25-14-kd
  kdlab eval outputs/2026-11-23/18-25-14-kd dataset=cifar10 split=test
  kdlab eval path/to/best.ckpt dataset=cifar100 out=eval-c100
  kdlab eval outputs/2026-11-23/18-25-14-kd split=train labels=clean
"""

SPLITS = ("test", "val", "meta", "train")
OPTIONS = ("split", "labels", "checkpoint", "precision", "accelerator", "out")
LABELS = ("given", "clean")
CONFIG_KEYS = ("dataset", "noise", "seed", "paths")


class EvalError(KdlabError):
    """What kdlab eval cannot do, in one line."""


# -- what to evaluate ------------------------------------------------------------------------


def find_checkpoint(path: Path, which: str) -> tuple[Path, Path | None]:
    """(checkpoint file, its run directory or None) for a run directory or a checkpoint."""
    if not path.exists():
        raise EvalError(f"no such run directory or checkpoint: {path}")
    if path.is_dir():
        if which not in ("best", "last"):
            raise EvalError(f"checkpoint must be best or last, got {which!r}")
        ckpt = path / "checkpoints" / f"{which}.ckpt"
        if not ckpt.is_file():
            hint = ("; an unfinished run has only last.ckpt: checkpoint=last"
                    if which == "best" and (path / "checkpoints" / "last.ckpt").is_file() else
                    "; is it a kdlab run directory?")
            raise EvalError(f"{path} has no checkpoints/{which}.ckpt{hint}")
        return ckpt, path
    run_dir = path.parent.parent
    if path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        return path, run_dir
    return path, None


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if "Weights only load failed" in text:
            first = ("not a checkpoint of tensors (kdlab reads checkpoints with "
                     "weights_only=True)")
        raise EvalError(f"cannot read checkpoint {ckpt}: {first}") from None
    hparams = data.get("hyper_parameters") if isinstance(data, dict) else None
    if not isinstance(hparams, dict) or not {"student", "num_classes", "input_shape"} <= set(
            hparams) or "state_dict" not in data:
        raise EvalError(f"{ckpt} is not a kdlab checkpoint (no student hyperparameters); "
                        "give a run directory or a checkpoint written by kdlab train")
    return data


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """(kdlab eval options, config overrides); unknown keys are an error with a hint."""
    from .config import suggest

    options, overrides = {}, []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise EvalError(f"expected key=value, got {arg!r} (kdlab eval --help)")
        if key in OPTIONS:
            options[key] = value
        elif key.split(".")[0] in CONFIG_KEYS:
            overrides.append(arg)
        else:
            hint = suggest(key, [*OPTIONS, *CONFIG_KEYS]) or (
                f"; kdlab eval takes {', '.join(OPTIONS)} and {', '.join(CONFIG_KEYS)}(.*)")
            raise EvalError(f"unknown key {key}{hint}")
    split = options.get("split", "test")
    if split not in SPLITS:
        raise EvalError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    labels = options.get("labels", "given")
    if labels not in LABELS:
        raise EvalError(f"labels must be given (the split's own, noisy on a noisy train split) "
                        f"or clean, got {labels!r}")
    return options, overrides


def _compose(overrides: list[str]) -> DictConfig:
    from .config import compose

    try:
        return compose(overrides)
    except KdlabError:
        raise
    except Exception as e:
        raise EvalError(hydra_error_line(e)) from None


def data_config(run_cfg: DictConfig | None, overrides: list[str]) -> DictConfig:
    """dataset, noise, seed and choices for the evaluation: the run's own, with overrides;
    ``dataset=NAME`` / ``noise=NAME`` take kdlab's config of that name instead, and
    ``paths.data_dir=DIR`` moves the run's own dataset root as it would in kdlab train."""
    from .config import check_signature
    from .preflight import check_noise

    groups = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides
              if o.split("=", 1)[0] in ("dataset", "noise")}
    paths = [o for o in overrides if o.startswith("paths.")]
    dotted = [o for o in overrides if o.split("=", 1)[0] not in ("dataset", "noise")
              and o not in paths]
    if run_cfg is None and "dataset" not in groups:
        raise EvalError("a checkpoint outside a run directory needs the data named: add "
                        "dataset=NAME (e.g. dataset=cifar100)")
    cfg = OmegaConf.create({"dataset": {}, "noise": {"type": "none", "rate": 0.0}, "seed": 0,
                            "choices": {}})
    if run_cfg is not None:
        for key in ("dataset", "noise", "seed", "choices"):
            if key in run_cfg:
                cfg[key] = run_cfg[key]
    if run_cfg is None or groups or paths:
        name = groups.get("dataset") or cfg.choices.get("dataset")
        fresh = _compose([f"{k}={v}" for k, v in groups.items()]
                         + ([f"dataset={name}"] if name and "dataset" not in groups else [])
                         + paths)
        for key in groups:
            cfg[key] = OmegaConf.to_container(fresh[key], resolve=True)
            cfg.choices[key] = groups[key]
        if run_cfg is None:
            cfg.seed = fresh.seed
        if paths and "dataset" not in groups and "root" in cfg.dataset:
            cfg.dataset.root = OmegaConf.select(fresh, "dataset.root")
    for override in dotted:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
    check_signature("dataset", cfg.dataset, ("recipe",))
    check_noise(cfg.noise)
    return cfg


def default_out(ckpt: Path, run_dir: Path | None, dataset: str, split: str,
                labels: str = "given") -> Path:
    """<run dir>/eval-<dataset>[-<split>][-clean][-<checkpoint>]; next to a lone checkpoint:
    eval-<dataset>[-<split>][-clean]-<checkpoint name>."""
    parts = [dataset] + ([split] if split != "test" else []) + (
        [labels] if labels != "given" else [])
    if run_dir is None or ckpt.stem != "best":
        parts.append(ckpt.stem)
    return (run_dir if run_dir is not None else ckpt.parent) / ("eval-" + "-".join(parts))


# -- evaluating ------------------------------------------------------------------------------


def build_student(data: dict[str, Any]):
    """The checkpoint's student with its weights (no method, no teacher)."""
    from .models import build_model

    hp = data["hyper_parameters"]
    student = build_model(hp["student"], int(hp["num_classes"]), tuple(hp["input_shape"]),
                          where="student")
    prefix = "student."
    state = {k[len(prefix):]: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise EvalError(f"the checkpoint's student weights do not fit its own architecture "
                        f"({first})") from None
    return student


def student_prediction(hparams: dict[str, Any]):
    """The prediction from the student's logits: its method's ``predict`` (mixup KD's
    s / std(s)), the method rebuilt from its configuration; the logits themselves for a
    checkpoint without a method."""
    from .methods import instantiate_method

    if not hparams.get("method"):
        return lambda logits: logits
    return instantiate_method(hparams["method"]).predict


def check_data_fits(hparams: dict[str, Any], dm, dataset: str) -> None:
    """The student's classes and input shape against the dataset's (those it knows yet)."""
    classes, shape = int(hparams["num_classes"]), tuple(hparams["input_shape"])
    dm_classes, dm_shape = getattr(dm, "num_classes", None), getattr(dm, "input_shape", None)
    if dm_classes is not None and int(dm_classes) != classes:
        raise EvalError(f"the student predicts {classes} classes but dataset {dataset} has "
                        f"{dm_classes}; evaluate it on a {classes}-class dataset")
    if dm_shape is not None and tuple(dm_shape) != shape:
        raise EvalError(f"the student takes inputs of shape {shape} but dataset {dataset} "
                        f"gives {tuple(dm_shape)}")


def evaluate(path: str | Path, args: list[str] = ()) -> dict[str, Any]:
    """Evaluate and write eval.json + reliability.png; returns what eval.json holds."""
    options, overrides = parse_overrides(list(args))
    ckpt, run_dir = find_checkpoint(Path(path), options.get("checkpoint", "best"))
    data = read_checkpoint(ckpt)
    run_cfg = OmegaConf.load(run_dir / "config.yaml") if run_dir else None
    results_file = run_dir / "results.json" if run_dir else None
    run_results = (json.loads(results_file.read_text())
                   if results_file is not None and results_file.is_file() else None)
    cfg = data_config(run_cfg, overrides)
    split, labels = options.get("split", "test"), options.get("labels", "given")

    from .data import instantiate_datamodule
    from .loggers import quiet_lightning

    quiet_lightning()
    dm = instantiate_datamodule(cfg)
    dataset = str(cfg.choices.get("dataset") or dm.name)
    hparams = data["hyper_parameters"]
    check_data_fits(hparams, dm, dataset)  # before any data is read or downloaded
    student = build_student(data)
    dm.check()
    dm.setup()
    check_data_fits(hparams, dm, dataset)
    if labels == "clean":
        dm.use_clean_labels(split)

    precision = options.get("precision") or (run_results or {}).get("precision") or "32-true"
    metrics, bins = _evaluate(student, student_prediction(hparams), dm, split, precision,
                              options.get("accelerator", "auto"))
    out = Path(options["out"]) if options.get("out") else default_out(ckpt, run_dir, dataset,
                                                                        split, labels)
    return _write(out, ckpt, run_dir, run_cfg, run_results, data, student, cfg, dataset, split,
                  labels, dm, precision, metrics, bins)


def describe_labels(split: str, labels: str, noise: dict[str, Any], trained_on: bool) -> str:
    """Which labels an evaluation scores against, in words. ``noise``: the datamodule's
    (type, rate, realised_rate); ``trained_on``: the data and noise are the run's own."""
    if split != "train":
        return f"{split} split, clean labels (label noise only touches the train split)"
    if noise["type"] == "none" or not noise["rate"]:
        return "train split, clean labels (no label noise)"
    kind = f"{noise['type']} {noise['rate']:g} noise"
    realised = f"realised rate {noise['realised_rate']:.3f}"
    if labels == "clean":
        return (f"train split, clean labels: those before the {kind}"
                f"{' the student trained on' if trained_on else ''} ({realised})")
    return (f"train split with {kind} ({realised})"
            f"{': the labels the student trained on' if trained_on else ''}; "
            "labels=clean scores against the clean ones")


def _evaluate(student, predict, dm, split: str, precision: str, accelerator: str):
    from .evaluation import evaluate_student
    from .trainer import resolve_precision

    # Lightning's banner lines (GPU available, ...) say nothing about an evaluation.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    return evaluate_student(student, dm, split, resolve_precision(precision, accelerator),
                            accelerator, predict)


def _write(out, ckpt, run_dir, run_cfg, run_results, data, student, cfg, dataset, split,
           labels, dm, precision, metrics, bins) -> dict[str, Any]:
    from .io import atomic_write_json
    from .models import describe_model
    from .plots import reliability_diagram

    name = ((run_cfg or {}).get("choices") or {}).get("student") or str(
        data["hyper_parameters"]["student"].get("_target_", "student")).rsplit(".", 1)[-1]
    student = describe_model(str(name), student)
    which = {"best": "test", "last": "test_last"}.get(ckpt.stem)
    same_data = (run_results is not None and split == "test" and which is not None
                 and run_results.get("dataset") == dataset
                 and OmegaConf.to_container(cfg.dataset) == OmegaConf.to_container(
                     (run_cfg or {}).get("dataset", {})))
    keys = ("dataset", "noise", "seed")  # the student's own training labels?
    trained_on = run_cfg is not None and OmegaConf.to_container(
        OmegaConf.create({k: cfg.get(k) for k in keys})) == OmegaConf.to_container(
        OmegaConf.create({k: run_cfg.get(k) for k in keys}))
    noise = dm.describe()["noise"]
    report = {
        "checkpoint": str(ckpt), "run_dir": str(run_dir) if run_dir else None,
        # the epoch the checkpoint was written after, counted from 1 (Lightning's from 0)
        "epoch": None if data.get("epoch") is None else int(data["epoch"]) + 1,
        "student": student, "dataset": dataset, "split": split,
        "labels": {"kind": labels,
                   "description": describe_labels(split, labels, noise, trained_on)},
        "size": len(dm.splits[split]), "noise": noise, "seed": int(cfg.seed),
        "precision": str(precision), "metrics": metrics,
        "reliability": {"n_bins": len(bins["count"]), **bins},
        # the run's own numbers for this checkpoint on this data, for comparison
        "run_results_test": run_results.get(which) if same_data else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", report)
    title = f"{student['name']} ({ckpt.name}) on {dataset} {split}" + (
        f", {'noisy' if labels == 'given' else 'clean'} labels"
        if split == "train" and noise["type"] != "none" and noise["rate"] else "")
    reliability_diagram(bins, out / "reliability.png", title)
    print(summary(report, out))
    return report


def summary(report: dict[str, Any], out: Path) -> str:
    from .metrics import RESULT_METRICS

    rows = [("this evaluation", report["metrics"])]
    if report["run_results_test"]:
        rows.append(("the run's results.json (test)", report["run_results_test"]))
    width = max(len(label) for label, _ in rows)
    lines = [" " * width + "".join(f"{h:>9}" for h in ("acc", "top-5", "ECE", "NLL", "Brier"))]
    for label, m in rows:
        cells = "".join(f"{m[k]:9.4f}" if k in m else f"{'-':>9}" for k in RESULT_METRICS)
        lines.append(f"{label:<{width}}{cells}")
    student = report["student"]
    epoch = f", epoch {report['epoch']}" if report["epoch"] is not None else ""
    head = (f"kdlab eval: student {student['name']} ({student['arch']}) from "
            f"{report['checkpoint']}{epoch}\non {report['dataset']} {report['split']} "
            f"({report['size']} examples, precision {report['precision']})\n"
            f"labels: {report['labels']['description']}")
    body = "\n".join(lines)
    return f"{head}\n{body}\nwrote {out / 'eval.json'} and {out / 'reliability.png'}"


def main(argv: list[str]) -> None:
    if not argv:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    try:
        evaluate(argv[0], argv[1:])
    except KdlabError as e:
        print(f"kdlab eval: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:  # one line all the same; HYDRA_FULL_ERROR-style detail is not ours
        text = str(e).strip()
        first = text.splitlines()[0] if text else ""
        print(f"kdlab eval: error: unexpected {type(e).__name__}: {first}", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["evaluate", "main"]
