"""Calibration of the online and mixup methods against KD and CE: accuracy, ECE and NLL.

    .venv/bin/python scripts/calibration_comparison.py                 # the full grid
    .venv/bin/python scripts/calibration_comparison.py --datasets digits --seeds 0 --tag quick

Grid: datasets digits (student cnn_small, teacher cnn, 30 epochs) and synthetic (student
mlp_small <- teacher mlp_large, 100 epochs): each dataset's default pair and recipe (SGD,
cosine schedule), with a separate clean validation split (``dataset.val_fraction=0.1``) on
which the best epoch is selected; the test split is evaluated once for that epoch. Seeds 0, 1,
2. Variants:

- ``ce``, ``kd`` (T = 4, 0.1 CE + 0.9 KL; teacher = CE on the same split, auto-trained);
- ``dml`` (peer = the student's architecture) and ``bdkd`` (peer = the online teacher, the
  teacher's architecture, trained from scratch with the student): both networks are rows;
- ``mixup_kd`` (the stated 10 % mixed, evaluated on softmax(s / std(s)) as in the paper),
  ``mixup_kd raw`` (the same training evaluated on the raw logits) and ``mixup_kd 41%``
  (the released code's draw).

Every run goes through ``kdlab.pipeline.run`` in this one process, fp32 on the CPU, one thread.
Finished runs are reused when the script is started again with the same ``--work``
directory. Tabulated with ``kdlab.report`` (results_frame / summarize / markdown_table):
mean ± std over seeds. Output: ``scripts/results/calibration[_TAG].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {
    "digits": {"overrides": ["dataset=digits", "student=cnn_small", "teacher=cnn"],
               "epochs": 30},
    "synthetic": {"overrides": ["dataset=synthetic", "student=mlp_small",
                                "teacher=mlp_large"], "epochs": 100},
}
VARIANTS = {
    "ce": ["method=ce"],
    "kd": ["method=kd"],
    "dml": ["method=dml"],
    "bdkd": ["method=bdkd"],
    "mixup_kd": ["method=mixup_kd"],
    "mixup_kd raw": ["method=mixup_kd", "method.standardize_eval_logits=false"],
    "mixup_kd 41%": ["method=mixup_kd", "method.partial=released"],
}
PEER_ROWS = {"dml": "dml peer", "bdkd": "bdkd online teacher"}
METRICS = ["test.acc", "test.ece", "test.nll"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None,
                   help="override every dataset's epoch count (default: its recipe)")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--work", type=Path, default=Path("/tmp/kdlab_calibration"),
                   help="run directories and the teacher cache")
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "results")
    return p.parse_args(argv)


def run_dir_name(dataset: str, variant: str, seed: int, epochs: int) -> str:
    return f"{dataset}-e{epochs}-{variant.replace(' ', '_').replace('%', 'pct')}-s{seed}"


def run_one(dataset: str, variant: str, seed: int, args) -> tuple[Path, bool]:
    from kdlab.config import compose
    from kdlab.pipeline import run

    spec = DATASETS[dataset]
    epochs = args.epochs or spec["epochs"]
    overrides = [*spec["overrides"], *VARIANTS[variant], f"seed={seed}", "trainer=cpu",
                 f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
                 "num_threads=1", "dataset.val_fraction=0.1"]
    run_dir = args.work / "runs" / run_dir_name(dataset, variant, seed, epochs)
    if (run_dir / "results.json").exists():
        return run_dir, True
    if run_dir.exists():  # an interrupted attempt: start it again
        shutil.rmtree(run_dir)
    cfg = compose(overrides)
    with open(args.work / "runs.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        run(cfg, run_dir)
    return run_dir, False


def table(run_dirs: dict[Path, tuple[str, str]]):
    """One row per network: each variant's student, the online peers, and the KD teacher."""
    import pandas as pd

    from kdlab import report
    from kdlab.report import markdown_table, read_run, results_frame, summarize

    report.HEADERS.setdefault("test.nll", "test NLL (best)")  # this script's column title

    runs = [read_run(d) for d in run_dirs]
    frame = results_frame(runs, ["dataset"])
    frame["variant"] = [run_dirs[Path(p)][1] for p in frame["run"]]
    rows = [frame]
    for variant, label in PEER_ROWS.items():
        online = frame[frame["variant"] == variant]
        if len(online):
            peer = online.copy()
            for m in ("acc", "ece", "nll"):
                peer[f"test.{m}"] = online[f"peers.peer.{m}"]
            peer["variant"] = label
            rows.append(peer)
    kd = frame[frame["variant"] == "kd"]
    if len(kd):
        teacher = kd.copy()
        for m in ("acc", "ece", "nll"):
            teacher[f"test.{m}"] = kd[f"teachers.0.test.{m}"]
        teacher["variant"] = "teacher (CE; for kd, mixup_kd)"
        rows.append(teacher)
    full = pd.concat(rows, ignore_index=True)
    order = {v: i for i, v in enumerate([*VARIANTS, *PEER_ROWS.values(),
                                         "teacher (CE; for kd, mixup_kd)"])}
    full["_order"] = [(list(DATASETS).index(d), order.get(v, 99))
                      for d, v in zip(full["dataset"], full["variant"], strict=True)]
    full = full.sort_values("_order", kind="stable")
    keys = ["dataset", "variant"]
    summary = summarize(full, keys, METRICS)
    return markdown_table(summary, keys, METRICS), summary


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["KDLAB_CACHE_DIR"] = str(args.work / "cache")  # read by the config (oc.env)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(1)
    import kdlab.train  # noqa: F401  (imports Lightning, whose loggers are silenced next)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning", "kdlab")):
            logging.getLogger(name).setLevel(logging.WARNING)

    grid = [(d, v, s) for d in args.datasets for s in args.seeds for v in args.variants]
    run_dirs: dict[Path, tuple[str, str]] = {}
    start, reused, run_time = time.time(), 0, 0.0
    for i, (dataset, variant, seed) in enumerate(grid, 1):
        t0 = time.time()
        path, was_done = run_one(dataset, variant, seed, args)
        run_dirs[path] = (dataset, variant)
        results = json.loads((path / "results.json").read_text())
        reused += was_done
        run_time += results["wall_time_s"]
        peer = results.get("peers", {}).get("peer")
        extra = f" | peer acc {peer['acc']:.4f} ece {peer['ece']:.4f}" if peer else ""
        print(f"[{i}/{len(grid)}] {dataset} {variant:<13} seed {seed}: "
              f"acc {results['test']['acc']:.4f} ece {results['test']['ece']:.4f} "
              f"nll {results['test']['nll']:.4f}{extra} ({time.time() - t0:.0f} s, "
              f"total {time.time() - start:.0f} s)", flush=True)

    markdown, summary = table(run_dirs)
    epochs = {d: args.epochs or DATASETS[d]["epochs"] for d in args.datasets}
    command = "python scripts/calibration_comparison.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    reused_note = f" ({reused} of {len(grid)} runs reused)" if reused else ""
    report = (
        "# Calibration of online and mixup methods (vs KD and CE)\n\n"
        f"Command: `{command.strip()}`  \n"
        f"Epochs: {', '.join(f'{d} {e}' for d, e in epochs.items())}; seeds {args.seeds}; "
        "each dataset's default pair and recipe (SGD, cosine), fp32 on the CPU. Test accuracy, "
        "ECE (15 bins) and NLL of the epoch with the best accuracy on a separate 10 % "
        "validation split (`dataset.val_fraction=0.1`), as fractions, mean ± std over seeds. "
        "Peer rows: the online network of the same runs, tested at the student's selected "
        "epoch. `mixup_kd` is evaluated on softmax(s / std(s)) (the paper's prediction), "
        "`mixup_kd raw` is the same training evaluated on the raw logits, `mixup_kd 41%` "
        "mixes like the released code. "
        f"Total time {time.time() - start:.0f} s, run time {run_time:.0f} s{reused_note}.\n\n"
        + markdown + "\n")
    print("\n" + report)
    suffix = f"_{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibration{suffix}.md").write_text(report)
    (args.out / f"calibration{suffix}.json").write_text(
        summary.to_json(orient="records", indent=1) + "\n")


if __name__ == "__main__":
    main()
