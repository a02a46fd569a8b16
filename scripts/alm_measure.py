"""ALM-KD variants against CE, KD and KD tuned on val, with clean-label teachers.

    .venv/bin/python scripts/alm_measure.py --dataset digits --seeds 0 1 2 \
        --variant authors=method.step_scale=authors --variant auto= \
        --baselines

Every run: symmetric noise (``--rate``, default 0.4) on the train split, a separate clean val
split (``dataset.val_fraction=0.1``) for model selection, a CE teacher trained on the clean
labels of the same train split per seed (scripts/alm_runs.py). ``--variant NAME=o1,o2``
adds ALM-KD with overrides o1, o2 (empty: the defaults). ``--baselines`` adds CE, KD
(0.1 / 0.9) and the KD weight grid; "KD tuned" is the grid point with the best mean val
accuracy over the seeds. Runs are reused from ``--work``. Prints one markdown table:
mean +/- std over seeds of test accuracy, ECE (15 bins), NLL, the label weight on clean /
noisy examples (mean, and median) and the noise AUROC of the final label weight.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alm_runs import WORK, mean_std, method_overrides, run_cfg  # noqa: E402

KD_GRID = [(ce, kd) for ce in (0.0, 0.1, 0.3, 1.0, 2.0) for kd in (0.5, 0.9, 2.0, 4.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--rate", type=float, default=0.4)
    p.add_argument("--noise", default="symmetric")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--baselines", action="store_true")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--work", type=Path, default=WORK / "measure")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    return p.parse_args(argv)


def one(args, method, name, extra, seed) -> dict:
    overrides = method_overrides(args.dataset, method, args.rate, seed, extra,
                                 epochs=args.epochs, noise=args.noise)
    from alm_runs import DATASETS

    epochs = args.epochs or DATASETS[args.dataset]["epochs"]
    run_dir = args.work / f"{args.dataset}-{args.noise}{args.rate}-e{epochs}" / f"{name}-s{seed}"
    start = time.time()
    res = run_cfg(overrides, run_dir)
    return {"name": name, "method": method, "seed": seed, "overrides": overrides,
            "test": res["test"], "val": res["val"], "mixing": res.get("mixing"),
            "teacher_test": (res["teachers"][0]["test"] if res.get("teachers") else None),
            "wall_s": round(time.time() - start, 1)}


def row(name, runs) -> str:
    acc = mean_std([r["test"]["acc"] for r in runs], 100)
    ece = mean_std([r["test"]["ece"] for r in runs], 100)
    nll = mean_std([r["test"].get("nll") for r in runs], 1, 3)
    mix = [r["mixing"] for r in runs if r.get("mixing")]
    cells = ["", "", ""]
    if mix:
        cells = [f"{mean_std([m['label_weight_clean'] for m in mix])} "
                 f"({statistics.mean(m['label_weight_clean_median'] for m in mix):.2f})",
                 f"{mean_std([m['label_weight_noisy'] for m in mix])} "
                 f"({statistics.mean(m['label_weight_noisy_median'] for m in mix):.2f})",
                 mean_std([m.get("noise_auroc") for m in mix], 1, 3)]
        teach = [m.get("teacher_weight_clean") for m in mix]
        cells.append(mean_std(teach))
    else:
        cells.append("")
    return f"| {name} | {acc} | {ece} | {nll} | " + " | ".join(cells) + f" | {len(runs)} |"


def main(argv=None):
    args = parse_args(argv)
    runs: dict[str, list[dict]] = {}
    if args.baselines:
        runs["ce"] = [one(args, "ce", "ce", [], s) for s in args.seeds]
        runs["kd (0.1 / 0.9)"] = [one(args, "kd", "kd", [], s) for s in args.seeds]
        grid = {}
        for ce, kd in KD_GRID:
            name = f"kd_{ce}_{kd}"
            grid[name] = [one(args, "kd", name, [f"method.ce_weight={ce}",
                                                  f"method.kd_weight={kd}"], s)
                          for s in args.seeds]
        best = max(grid, key=lambda n: statistics.mean(r["val"]["acc"] for r in grid[n]))
        runs[f"kd tuned on val ({best[3:].replace('_', ' / ')})"] = grid[best]
        top = sorted(grid, key=lambda n: -statistics.mean(r["test"]["acc"] for r in grid[n]))[0]
        runs[f"(kd grid, best on TEST: {top[3:].replace('_', ' / ')})"] = grid[top]
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        extra = [e for e in extra.split(",") if e]
        runs[f"alm_kd {name}"] = [one(args, "alm_kd", f"alm-{name}", extra, s)
                                  for s in args.seeds]
    teacher = [r["teacher_test"]["acc"] for rs in runs.values() for r in rs
               if r.get("teacher_test")]
    print(f"\n{args.dataset}, {args.noise} {args.rate}, seeds {args.seeds}; clean-label "
          f"teacher test acc {mean_std(teacher[:len(args.seeds)], 100)}\n")
    print("| method | test acc | ECE | NLL | label w. clean (median) | label w. noisy (median) "
          "| noise AUROC | teacher w. | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        print(row(name, rs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        old.update({name: rs for name, rs in runs.items()})
        args.json.write_text(json.dumps(old, indent=1))


if __name__ == "__main__":
    main()
