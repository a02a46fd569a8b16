"""Every shipped method on one dataset's default pair: test accuracy, ECE and NLL over seeds.

    .venv/bin/python scripts/method_zoo.py --jobs 2                    # fashion_mnist, 3 seeds
    .venv/bin/python scripts/method_zoo.py --methods ce kd dkd --seeds 0 --tag quick
    .venv/bin/python scripts/method_zoo.py --finished-only             # the table so far

Each method config in conf/method/ (``--methods`` to choose) trains the dataset's default
student from its default teacher (auto-trained with CE on the same split and seed, clean
labels), on the dataset's recipe, with the method's own defaults; the epoch is selected on
the separate clean validation split and the test split is evaluated once, for that epoch.
Rows: the teacher (its test numbers, from the KD runs), then every method (``ce`` is the
student trained alone; every row's accuracy difference from it comes with a 95 % interval,
paired by seed). Runs are keyed by their resolved config and resumable
(``scripts/experiments.py``): start the script again after an interruption.

Output: ``scripts/results/zoo_<dataset>[_TAG].md`` (table), ``.json`` (every run) and
``.png`` (per method: test accuracy minus ce's with its 95 % interval, and ECE).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments import Run, execute  # noqa: E402

METRICS = ("acc", "ece", "nll")
BASELINE = "ce"  # the difference column: each row's test accuracy minus the student alone


def shipped_methods() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="method configs (default: every one in conf/method)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one core each)")
    p.add_argument("--work", type=Path, default=Path("/tmp/kdlab_zoo"),
                   help="run directories and the teacher caches (finished runs are reused)")
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "results")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: the tables of the runs that have finished (n per row "
                        "says how many seeds each has), e.g. while the zoo is still running")
    p.add_argument("overrides", nargs="*", help="extra kdlab train overrides for every run")
    return p.parse_args(argv)


def plan(args) -> list[Run]:
    methods = args.methods or shipped_methods()
    unknown = sorted(set(methods) - set(shipped_methods()))
    if unknown:
        raise SystemExit(f"method_zoo: error: unknown method {unknown[0]!r}; shipped: "
                         f"{', '.join(shipped_methods())}")
    # KD first: its runs train (and cache) the teacher of each seed that later runs reuse.
    methods = sorted(methods, key=lambda m: (m != "kd", m != "ce"))
    # Runs are keyed by their config: the cache hint counts every shipped method, so that a
    # subset (--methods) reuses the runs of a full zoo and the other way round.
    readers = len(shipped_methods())
    return [Run({"method": m, "seed": s},
                [f"dataset={args.dataset}", f"method={m}", f"seed={s}",
                 f"teacher_cache_runs={readers}", *args.overrides])
            for s in args.seeds for m in methods]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def rows(done: list[Run]) -> list[dict]:
    """One row per method: mean / std of each metric; the teacher's row first, then the
    baseline's and KD's, then the others by mean test accuracy, best first."""
    by_method: dict[str, list[Run]] = {}
    for run in done:
        by_method.setdefault(run.labels["method"], []).append(run)
    table = []
    teacher_runs = [r for r in done if r.results["teachers"]]
    if teacher_runs:  # one teacher per seed: count each seed once
        per_seed = {r.labels["seed"]: r.results["teachers"][0] for r in teacher_runs}
        arch = next(iter(per_seed.values()))["name"]
        table.append({"row": f"teacher ({arch}, CE)", "n": len(per_seed),
                      "acc_by_seed": {s: t["test"]["acc"] for s, t in per_seed.items()}, **{
            m: mean_std([t["test"][m] for t in per_seed.values()]) for m in METRICS}})
    for method, runs in by_method.items():
        table.append({"row": method, "n": len(runs),
                      "seconds": statistics.fmean(r.results["wall_time_s"] for r in runs),
                      "acc_by_seed": {r.labels["seed"]: r.results["test"]["acc"] for r in runs},
                      **{m: mean_std([r.results["test"][m] for r in runs]) for m in METRICS}})
    first = {BASELINE: 0, "kd": 1}
    return sorted(table, key=lambda r: (not r["row"].startswith("teacher"),
                                        first.get(r["row"], 2), -r["acc"][0]))


def markdown(table: list[dict]) -> str:
    def cell(value: tuple[float, float], scale: float, digits: int) -> str:
        mean, std = value
        text = f"{scale * mean:.{digits}f}"
        return text if std != std else f"{text} ± {scale * std:.{digits}f}"

    best = max(r["acc"][0] for r in table if not r["row"].startswith("teacher"))
    baseline = next((r for r in table if r["row"] == BASELINE), None)
    lines = [f"| row | n | test acc (%) | acc − {BASELINE} (95 % CI) | ECE (%) | NLL | s / run |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        acc = cell(r["acc"], 100, 2)
        if r["acc"][0] == best and not r["row"].startswith("teacher"):
            acc = f"**{acc}**"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(f"| {r['row']} | {r['n']} | {acc} | {difference(r, baseline)} | "
                     f"{cell(r['ece'], 100, 2)} | {cell(r['nll'], 1, 3)} | {seconds} |")
    return "\n".join(lines)


def difference_from(row: dict, baseline: dict | None) -> dict | None:
    """Test accuracy minus the baseline's in points, with the 95 % interval of
    ``kdlab.report.seed_difference`` (paired by seed where the two share >= 2 seeds); None
    for the baseline itself and without one."""
    import pandas as pd

    from kdlab.report import seed_difference

    if baseline is None or row is baseline or "acc_by_seed" not in row:
        return None
    return seed_difference(*(pd.Series(r["acc_by_seed"], dtype=float) * 100
                             for r in (row, baseline)))


def difference(row: dict, baseline: dict | None) -> str:
    """:func:`difference_from` as a table cell (``kdlab.report.difference_text``)."""
    from kdlab.report import difference_text

    return difference_text(difference_from(row, baseline))


def plot(table: list[dict], path: Path, title: str, span: float = 3.0) -> None:
    """Two panels: each row's test accuracy minus the baseline's with its 95 % interval
    (the axis clipped to +/- ``span`` points: rows beyond it are drawn at the edge with their
    value written), and ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kdlab.report import resolved

    baseline = next((r for r in table if r["row"] == BASELINE), None)
    names = [r["row"] for r in table]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(names) + 1.6), sharey=True)
    y = np.arange(len(names))
    colors = ["grey" if n.startswith("teacher") else
              "black" if n in ("ce", "kd") else "tab:blue" for n in names]
    ax = axes[0]
    for i, r in enumerate(table):
        found = difference_from(r, baseline)
        if found is None:
            if r is baseline:
                ax.plot([0], [i], "|", color=colors[i], ms=12)
            continue
        diff, lo, hi = found["diff"], found["lo"], found["hi"]
        clipped = min(max(diff, -span), span)
        filled = resolved(lo, hi)  # False for a NaN interval (one run each)
        ax.plot([clipped], [i], "o", color=colors[i], mfc=colors[i] if filled else "white",
                clip_on=False)
        if not math.isnan(lo):
            ax.plot([max(lo, -span), min(hi, span)], [i, i], color=colors[i], lw=1.5)
        if abs(diff) > span:
            ax.annotate(f"{diff:+.1f}", (clipped, i), xytext=(-6 if diff > 0 else 6, 4),
                        textcoords="offset points", fontsize=8,
                        ha="right" if diff > 0 else "left")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(-span, span)
    ax.set_xlabel(f"test accuracy − {BASELINE} (points), 95 % interval paired by seed "
                  "(filled: excludes 0)")
    ax.grid(axis="x", alpha=0.3)
    means = np.array([100 * r["ece"][0] for r in table])
    stds = np.nan_to_num(np.array([100 * r["ece"][1] for r in table]))
    axes[1].barh(y, means, xerr=stds, color=colors, capsize=2)
    axes[1].set_xlabel("ECE (%), mean ± std")
    axes[1].grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = plan(args)
    print(f"{len(runs)} runs ({args.jobs} at a time) in {args.work}", flush=True)
    start = time.time()
    done = execute(runs, args.work, args.jobs, train=not args.finished_only)
    if not done:
        raise SystemExit(f"method_zoo: error: none of the {len(runs)} runs has finished in "
                         f"{args.work}; run without --finished-only to train them")
    table = rows(done)
    command = " ".join(["scripts/method_zoo.py", *(argv if argv is not None else sys.argv[1:])])
    took = ("the runs finished so far, nothing trained" if args.finished_only else
            f"{(time.time() - start) / 3600:.1f} h with reused runs not counted again")
    text = (f"# Every method on {args.dataset}\n\nCommand: `.venv/bin/python {command}` "
            f"({took})  \n"
            "The dataset's default pair and recipe; each method at its defaults; the epoch with "
            "the best val accuracy (ties: lower val NLL, then later) on a separate clean "
            "validation split; test accuracy / ECE (15 bins) / NLL of that epoch, mean ± std "
            "over seeds (n); acc − ce: the difference from the student trained alone with "
            "its 95 % t interval, paired by seed (* where it excludes 0); s / run: mean wall "
            "time of a run (teacher training not counted); bold: the best student.\n\n"
            + markdown(table) + "\n")
    print("\n" + text)
    suffix = f"_{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"zoo_{args.dataset}{suffix}.md").write_text(text)
    (args.out / f"zoo_{args.dataset}{suffix}.json").write_text(json.dumps(
        [{**r.labels, "overrides": r.overrides, "test": r.results["test"],
          "val": r.results["val"], "wall_time_s": r.results["wall_time_s"],
          "teacher_test": [t["test"] for t in r.results["teachers"]]} for r in done], indent=1))
    plot(table, args.out / f"zoo_{args.dataset}{suffix}.png",
         f"every method on {args.dataset}, seeds {args.seeds}")


if __name__ == "__main__":
    main()
