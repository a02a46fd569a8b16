"""ALM-KD under label noise: the evidence table, against the strongest fair baselines.

    .venv/bin/python scripts/alm_noise_experiment.py --jobs 2          # everything (hours)
    .venv/bin/python scripts/alm_noise_experiment.py --settings fashion_mnist-sym0.4 --jobs 2
    (seeds: --seeds 0 1 2 3 4 for digits, --synthetic-seeds 0 1 2 for synthetic,
    --fmnist-seeds 0 1 2 for Fashion-MNIST)

Every run selects its epoch on a separate clean validation split (``dataset.val_fraction
0.1``), which no method is fitted to; test is evaluated once, for that epoch. Settings:
Fashion-MNIST (real data: vgg6 <- vgg7x4, 15 epochs, its recipe, bf16 on the CPU) with
symmetric 0.4, pairflip 0.45 and asymmetric 0.4 noise (kdlab's class map); digits (30
epochs, its recipe) and synthetic (the authors' generator, 100 epochs, lr 0.01, cosine) with
symmetric noise 0.2 and 0.4, and a class-dependent one (pairflip 0.3 on digits), fp32.
Teachers: trained on the clean labels of the same train split
(``teacher.label_noise=none``: the authors' setting) and on the noisy labels, as separate
rows. The experiment configs ``digits_alm_multi_teacher`` (three teachers; its KD rows are
``multi_teacher_kd`` with the same teachers) and ``digits_alm_self_distill`` (a teacher of
the student's architecture) at symmetric 0.4. Rows:

- ce, kd (0.1 / 0.9, T 4): the usual baselines;
- kd tuned: KD whose two weights are chosen on val from a grid (mean val accuracy over the
  setting's seeds; Fashion-MNIST: a 3 x 3 grid on seed 0, for the time budget, the chosen
  weights then run on every seed): the honest baseline, since ALM-KD also learns from clean
  data (not for the multi-teacher and self-distillation settings: those compare against
  KD with the same teachers);
- ce +meta, kd tuned +meta: trained on train + the clean meta split (the clean data ALM-KD
  sees; ``dataset.train_on_meta``);
- alm_kd: ALM-KD at its defaults; alm_kd paper: the authors' algorithm (``method.paper=true``:
  their step with meta_lr 1500, their kernel, no global scales), plus any
  ``--alm-variant NAME=OVERRIDES`` rows;
- tgeo_kd (single-teacher settings): TGeo-KD at its defaults, ALM-KD's closest rival (a
  per-example KD/CE ratio from an MLP over student / teacher / label geometry, trained on
  the same clean meta split).

Columns: test acc, ECE, NLL (best-on-val epoch; mean ± std over seeds), and for ALM-KD the
mean label weight on clean / noisy training examples and the noise AUROC (how well a low
label weight picks out the noisy labels); for TGeo-KD the label weight is 1 - alpha, each
example's ratio the last time it was trained on. Runs go through ``scripts/experiments.py``
(in-process, in ``--jobs`` worker processes, one thread each; keyed by their resolved config:
finished runs in ``--work`` are reused, interrupted ones resumed). Tables: stdout,
``scripts/results/alm_noise[_TAG].md`` (the rows, then ALM-KD minus each row, paired by
seed with its 95 % interval); a bar chart: ``.png``; every run: ``.json``.
``--tables-from A.json B.json`` runs nothing and writes the tables and chart of earlier
records together (e.g. settings run in separate invocations).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments import Run, execute  # noqa: E402

DATASETS = {
    "digits": ["dataset=digits", "dataset.val_fraction=0.1"],
    "synthetic": ["dataset=synthetic", "dataset.val_fraction=0.1"],
    # real data: bf16 on the CPU (2x faster), the views cache for KD-type rows (every run
    # of a setting reads the same teacher; teacher_cache=auto builds it)
    "fashion_mnist": ["dataset=fashion_mnist", "trainer.precision=auto",
                      "teacher_cache_runs=8"],
}
SYM = {rate: ["noise=symmetric", f"noise.rate={rate}"] for rate in (0.2, 0.4)}
SETTINGS = {  # name: (dataset, overrides, the KD method with the same teachers, tuned KD row)
    "digits-sym0.2": ("digits", SYM[0.2], "kd", True),
    "digits-sym0.4": ("digits", SYM[0.4], "kd", True),
    "digits-pairflip0.3": ("digits", ["noise=pairflip", "noise.rate=0.3"], "kd", True),
    "synthetic-sym0.2": ("synthetic", SYM[0.2], "kd", True),
    "synthetic-sym0.4": ("synthetic", SYM[0.4], "kd", True),
    # the experiment configs: three teachers (cnn, mlp, narrow cnn), and self-distillation
    "digits-sym0.4 multi-teacher": ("digits", [*SYM[0.4], "experiment=digits_alm_multi_teacher"],
                                    "multi_teacher_kd", False),
    "digits-sym0.4 self": ("digits", [*SYM[0.4], "experiment=digits_alm_self_distill"], "kd",
                           False),
    "fashion_mnist-sym0.4": ("fashion_mnist", SYM[0.4], "kd", True),
    "fashion_mnist-pairflip0.45": ("fashion_mnist", ["noise=pairflip", "noise.rate=0.45"], "kd",
                                   True),
    "fashion_mnist-asym0.4": ("fashion_mnist", ["noise=asymmetric", "noise.rate=0.4"], "kd",
                              True),
}
TEACHERS = {"clean": ["teacher.label_noise=none"], "noisy": ["teacher.label_noise=same"]}
# The corners matter: with a clean teacher the best KD on these recipes trusts the teacher
# fully and at a large loss scale (an effectively larger learning rate).
KD_GRID = {"ce_weight": [0.0, 0.1, 0.5, 1.0, 2.0], "kd_weight": [0.9, 2.0, 4.0, 8.0]}
# Fashion-MNIST: nine points, tuned on one seed (the time budget); the corners stay.
KD_GRID_SMALL = {"ce_weight": [0.0, 0.5, 1.0], "kd_weight": [0.9, 2.0, 4.0]}
ROWS = {  # name: (overrides, needs a teacher)
    "ce": (["method=ce"], False),
    "ce +meta": (["method=ce", "dataset.train_on_meta=true"], False),
    "kd": (["method=kd"], True),
    "alm_kd": (["method=alm_kd"], True),
    "alm_kd paper": (["method=alm_kd", "method.paper=true"], True),
    # ALM-KD's closest rival: a per-example ratio from an MLP over the student / teacher /
    # label geometry, meta-learned on the same clean split (label weight = 1 - alpha)
    "tgeo_kd": (["method=tgeo_kd"], True),
}
# The grid's choice on every seed; +meta: trained on train + meta, with a teacher trained
# there too (read by this one run: no views cache for it)
TUNED_ROWS = {"kd tuned": [],
              "kd tuned +meta": ["dataset.train_on_meta=true", "teacher_cache_runs=1"]}
SINGLE_TEACHER_ROWS = {"tgeo_kd"}  # not in the multi-teacher setting


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="seeds of the digits settings")
    p.add_argument("--synthetic-seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of the synthetic settings (runs 2-3x longer)")
    p.add_argument("--fmnist-seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of the Fashion-MNIST settings")
    p.add_argument("--fmnist-grid-seeds", nargs="+", type=int, default=[0],
                   help="seeds the Fashion-MNIST KD grid is tuned on")
    p.add_argument("--alm-variant", nargs="*", default=[], metavar="NAME=OVERRIDES",
                   help="extra ALM-KD rows, e.g. 'centered=method.kernel=centered' (overrides "
                        "separated by spaces inside the quotes)")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                   help="only these of the fixed rows (default: all)")
    p.add_argument("--no-grid", action="store_true", help="skip the tuned-KD grid")
    p.add_argument("--tuned-rows", nargs="+", default=list(TUNED_ROWS), choices=list(TUNED_ROWS),
                   help="the rows the grid's choice is trained for on every seed (default: "
                        "both; 'kd tuned +meta' trains a teacher on train + meta per seed)")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one core each)")
    p.add_argument("--work", type=Path, default=Path("/tmp/kdlab_alm_noise"),
                   help="run directories and the teacher cache (finished runs are reused)")
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "results")
    p.add_argument("--tables-from", nargs="+", type=Path, default=None, metavar="JSON",
                   help="run nothing: write the tables and plot of these .json records "
                        "(earlier outputs of this script) under --out / --tag")
    return p.parse_args(argv)


def seeds_of(dataset: str, args) -> list[int]:
    return {"synthetic": args.synthetic_seeds, "fashion_mnist": args.fmnist_seeds}.get(
        dataset, args.seeds)


def plan(args) -> list[Run]:
    """Every run of the table (setting, teachers, row, seed) and the KD grid's runs."""
    alm_rows = {"alm_kd " + name: (["method=alm_kd", *spec.split()], True)
                for name, spec in (v.split("=", 1) for v in args.alm_variant)}
    runs = []
    for setting in args.settings:
        dataset, noise, kd, tuned = SETTINGS[setting]
        base = [*DATASETS[dataset], *noise]
        rows = {k: v for k, v in ROWS.items() if args.rows is None or k in args.rows}
        # seeds innermost: the workers start on different seeds, so each trains its own
        # teacher (and builds its views cache) instead of waiting on the other's lock
        for row, (overrides, needs_teacher) in {**rows, **alm_rows}.items():
            if row in SINGLE_TEACHER_ROWS and kd == "multi_teacher_kd":
                continue
            overrides = [f"method={kd}" if o == "method=kd" else o for o in overrides]
            for kind, seed in itertools.product(args.teachers if needs_teacher else [None],
                                                seeds_of(dataset, args)):
                runs.append(Run({"setting": setting, "teachers": kind or "-", "row": row,
                                 "seed": seed},
                                [*base, *overrides, *(TEACHERS[kind] if kind else []),
                                 f"seed={seed}"]))
        if args.no_grid or not tuned:
            continue
        grid = KD_GRID_SMALL if dataset == "fashion_mnist" else KD_GRID
        grid_seeds = args.fmnist_grid_seeds if dataset == "fashion_mnist" else seeds_of(
            dataset, args)
        for kind, seed in itertools.product(args.teachers, grid_seeds):
            for ce_w, kd_w in itertools.product(grid["ce_weight"], grid["kd_weight"]):
                runs.append(Run({"setting": setting, "teachers": kind, "row": "kd grid",
                                 "grid": (ce_w, kd_w), "seed": seed},
                                [*base, f"method={kd}", f"method.ce_weight={ce_w}",
                                 f"method.kd_weight={kd_w}", *TEACHERS[kind], f"seed={seed}"]))
    return runs


def tuned_runs(done: list[Run], args) -> list[Run]:
    """KD tuned on val (per setting and teachers: the grid point with the best mean val
    accuracy over the grid's seeds) on every seed, and the same weights trained on train +
    meta. Runs the grid already made are reused (same config, same run)."""
    extra = []
    keys = sorted({(r.labels["setting"], r.labels["teachers"]) for r in done
                   if r.labels["row"] == "kd grid"})
    for setting, kind in keys:
        by_point: dict[tuple, list[float]] = {}
        for r in done:
            if r.labels["row"] == "kd grid" and r.labels["setting"] == setting \
                    and r.labels["teachers"] == kind:
                by_point.setdefault(r.labels["grid"], []).append(r.results["val"]["acc"])
        ce_w, kd_w = max(by_point, key=lambda g: statistics.fmean(by_point[g]))
        dataset, noise, kd, _ = SETTINGS[setting]
        # seeds innermost (see plan)
        rows = [(f"{name} ({ce_w:g} / {kd_w:g})", TUNED_ROWS[name]) for name in args.tuned_rows]
        for (row, more), seed in itertools.product(rows, seeds_of(dataset, args)):
            overrides = [*DATASETS[dataset], *noise, f"method={kd}", f"method.ce_weight={ce_w}",
                         f"method.kd_weight={kd_w}", *TEACHERS[kind], f"seed={seed}"]
            extra.append(Run({"setting": setting, "teachers": kind, "row": row,
                              "seed": seed}, [*overrides, *more]))
    return extra


def table(records: list[dict]) -> str:
    import pandas as pd

    from kdlab.report import metric_column, summarize

    frame = pd.json_normalize(records, sep=".")
    frame["seed"] = [str(r["seed"]) for r in records]
    frame["teacher.acc"] = [r["teacher_test"][0]["acc"] if r["teacher_test"] else float("nan")
                            for r in records]
    metrics = ["val.acc", "test.acc", "test.ece", "test.nll", "teacher.acc",
               "mixing.label_weight_clean", "mixing.label_weight_noisy", "mixing.noise_auroc"]
    metrics = [m for m in metrics if metric_column(frame, m) in frame]
    summary = summarize(frame, ["setting", "teachers", "row"], metrics)
    order = {name: i for i, name in enumerate(SETTINGS)}
    summary = summary.assign(_order=summary["setting"].map(order)).sort_values(
        ["_order", "teachers"], kind="stable")
    scale = {"val.acc": 100, "test.acc": 100, "test.ece": 100, "test.nll": 1,
             "teacher.acc": 100}

    def cell(row, m):
        mean, std = row[f"{m}_mean"], row[f"{m}_std"]
        if pd.isna(mean):
            return ""
        k = scale.get(m, 1)
        digits = 2 if m in scale and k == 100 else 3
        return f"{k * mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {k * std:.{digits}f}")

    headers = {"val.acc": "val acc (%)", "test.acc": "test acc (%)", "test.ece": "ECE (%)",
               "test.nll": "NLL",
               "teacher.acc": "teacher acc (%)", "mixing.label_weight_clean": "label w. clean",
               "mixing.label_weight_noisy": "label w. noisy", "mixing.noise_auroc": "noise AUROC"}
    out = summary[["setting", "teachers", "row", "n"]].copy()
    for m in metrics:
        out[headers[m]] = [cell(row, m) for _, row in summary.iterrows()]
    return out.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)


def differences(records: list[dict], baseline: str = "alm_kd") -> str:
    """ALM-KD minus every other row of its setting, per teacher kind (the CE rows, which have
    no teacher, against both): test accuracy and ECE in points, the mean difference over the
    shared seeds with its paired 95 % t interval (``kdlab report --baseline``'s rule), * where
    the interval excludes 0."""
    import pandas as pd

    from kdlab.report import difference_text, seed_difference

    def by_seed(rows: list[dict], metric: str) -> pd.Series:
        return pd.Series({r["seed"]: 100 * r["test"][metric] for r in rows})

    lines = ["| setting | teachers | row | n | ALM-KD - row, acc (points) | "
             "ALM-KD - row, ECE (points) |", "|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for kind in TEACHERS:
            base = [r for r in records if r["setting"] == setting and r["teachers"] == kind
                    and r["row"] == baseline]
            if not base:
                continue
            rows = sorted({r["row"] for r in records if r["setting"] == setting
                           and r["teachers"] in (kind, "-") and r["row"] != baseline},
                          key=lambda row: (PLOT_ROWS.index(row.split(" (")[0])
                                           if row.split(" (")[0] in PLOT_ROWS else 99, row))
            for row in rows:
                runs = [r for r in records if r["setting"] == setting and r["row"] == row
                        and r["teachers"] in (kind, "-")]
                cells = [difference_text(seed_difference(by_seed(base, metric),
                                                         by_seed(runs, metric)))
                         for metric in ("acc", "ece")]
                lines.append(f"| {setting} | {kind} | {row} | {len(runs)} | {cells[0]} | "
                             f"{cells[1]} |")
    return "\n".join(lines)


def wide_table(records: list[dict]) -> str:
    """The README's table: one line per (teachers, setting), one column per fixed row, test
    accuracy ± std / ECE (%) over seeds, the best accuracy of a line in bold, and ALM-KD's
    noise AUROC."""
    names = {"ce": "CE", "ce +meta": "CE +meta", "kd": "KD", "kd tuned": "KD tuned",
             "kd tuned +meta": "KD tuned +meta", "tgeo_kd": "TGeo-KD",
             "alm_kd paper": "ALM-KD paper", "alm_kd": "**ALM-KD**"}
    lines = ["| teachers trained on | setting | " + " | ".join(names.values())
             + " | ALM-KD noise AUROC |", "|---|---|" + "---|" * (len(names) + 1)]
    for kind in TEACHERS:
        for setting in SETTINGS:
            mine = [r for r in records if r["setting"] == setting
                    and r["teachers"] in (kind, "-")]
            if not any(r["teachers"] == kind for r in mine):
                continue
            cells, means = {}, {}
            for family in names:
                runs = [r for r in mine if r["row"].split(" (")[0] == family]
                if runs:
                    acc = [100 * r["test"]["acc"] for r in runs]
                    means[family] = statistics.fmean(acc)
                    sd = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
                    ece = statistics.fmean(100 * r["test"]["ece"] for r in runs)
                    cells[family] = (f"{means[family]:.2f}", f"{sd} / {ece:.1f}")
            best = max(means.values())
            cells = [("" if f not in cells else
                      (f"**{cells[f][0]}**" if means[f] == best else cells[f][0]) + cells[f][1])
                     for f in names]
            auroc = [r["mixing"]["noise_auroc"] for r in mine if r["row"] == "alm_kd"
                     and (r.get("mixing") or {}).get("noise_auroc") is not None]
            sd = f" ± {statistics.stdev(auroc):.3f}" if len(auroc) > 1 else ""
            lines.append(f"| {kind} labels | {setting} | " + " | ".join(cells)
                         + (f" | {statistics.fmean(auroc):.3f}{sd} |" if auroc else " | |"))
    return "\n".join(lines)


def write_outputs(records: list[dict], out: Path, tag: str, command: str,
                  write_records: bool = True) -> None:
    """The table, the differences from ALM-KD, every run (.json, unless the records are
    already files of their own) and the bar chart (.png)."""
    text, diffs, wide = table(records), differences(records), wide_table(records)
    print("\n" + text + "\n\n" + diffs + "\n\n" + wide)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    (out / f"alm_noise{suffix}.md").write_text(
        f"# ALM-KD under label noise\n\nCommand: `.venv/bin/python {command}`  \n"
        "Test acc / ECE (15 bins) / NLL of the best-on-val epoch (a clean val split no method "
        "is fitted to), mean ± std over the seeds (n); label w. = mean final label-loss weight "
        "on clean / noisy training examples; noise AUROC = how well a low label weight picks "
        "out the noisy labels. teachers: clean = trained on the clean labels of the train "
        "split (the authors' setting), noisy = on the noisy labels. Rows: see the script's "
        "docstring.\n\n" + text + "\n\n## ALM-KD minus each row\n\nPaired by seed: the "
        "mean difference with its 95 % t interval, * where it excludes 0 (the difference is "
        "resolved).\n\n" + diffs + "\n\n## Per setting (the README's table)\n\nTest "
        "accuracy ± std / ECE (%), the best accuracy of each line in bold.\n\n" + wide + "\n")
    if write_records:
        (out / f"alm_noise{suffix}.json").write_text(json.dumps(records, indent=1))
    plot(records, out / f"alm_noise{suffix}.png")


def unique_records(records) -> list[dict]:
    """Each run once: the records of two experiments share the rows without a teacher (CE,
    CE +meta: the same runs for clean- and noisy-label teachers)."""
    seen = {}
    for r in records:
        seen.setdefault((r["setting"], r["teachers"], r["row"], r["seed"]), r)
    return list(seen.values())


def main(argv=None) -> None:
    args = parse_args(argv)
    command = " ".join(["scripts/alm_noise_experiment.py", *(argv or sys.argv[1:])])
    if args.tables_from:  # no runs: the tables and plot of finished experiments' records
        records = unique_records(r for path in args.tables_from
                                 for r in json.loads(path.read_text()))
        write_outputs(records, args.out, args.tag, command, write_records=False)
        return
    runs = plan(args)
    print(f"{len(runs)} runs ({args.jobs} at a time) in {args.work}", flush=True)
    done = execute(runs, args.work, args.jobs)
    done = [r for r in done if r.labels["row"] != "kd grid"] + execute(
        tuned_runs(done, args), args.work, args.jobs)
    records = [{**r.labels, "overrides": r.overrides, "run_dir": r.run_dir,
                "test": r.results["test"], "val": r.results["val"],
                "best_epoch": r.results["best_epoch"], "mixing": r.results.get("mixing"),
                "wall_time_s": r.results["wall_time_s"],
                "teacher_test": [t["test"] for t in r.results["teachers"]]} for r in done]
    write_outputs(records, args.out, args.tag, command)


PLOT_ROWS = ["ce", "ce +meta", "kd", "kd tuned", "kd tuned +meta", "tgeo_kd", "alm_kd paper",
             "alm_kd"]


def plot(records: list[dict], path: Path) -> None:
    """Test accuracy (mean ± std over seeds) of every row, per setting: one panel for the
    clean-label teachers and one for the noisy-label ones, where the records have them (CE
    rows, which have no teacher, in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def family(row: str) -> str:  # "kd tuned (0.5 / 4)" -> "kd tuned"
        return row.split(" (")[0]

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in records)]
    rows = [f for f in PLOT_ROWS if any(family(r["row"]) == f for r in records)]
    kinds = [k for k in TEACHERS if any(r["teachers"] == k for r in records)] or ["clean"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(13, 4 * len(kinds)), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    width = 0.8 / len(rows)
    colors = plt.get_cmap("tab10").colors
    for ax, kind in zip(axes, kinds, strict=True):
        for j, row in enumerate(rows):
            means, stds = [], []
            for setting in settings:
                accs = [100 * r["test"]["acc"] for r in records
                        if r["setting"] == setting and family(r["row"]) == row
                        and r["teachers"] in (kind, "-")]
                means.append(np.mean(accs) if accs else np.nan)
                stds.append(np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
            x = np.arange(len(settings)) + (j - (len(rows) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, capsize=2, label=row,
                   color="black" if row == "alm_kd" else colors[j % len(colors)])
        finite = [100 * r["test"]["acc"] for r in records if r["teachers"] in (kind, "-")]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"teachers trained on the {kind} labels (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(np.arange(len(settings)), settings, rotation=15)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
