"""Reproduce the kdlab columns of the README's CIFAR-100 table, in one command, on a GPU machine.

    python scripts/reproduce_cifar100.py --dry-run     # the plan and its estimated GPU hours
    python scripts/reproduce_cifar100.py               # run it (or: make reproduce)
    python scripts/reproduce_cifar100.py --pairs resnet32x4-resnet8x4 --methods kd,dkd \\
        --seeds 0 --epochs 24 --data-dir /data -- trainer.devices=1

What it runs, as Hydra multiruns of ``kdlab train`` (the trainer default picks the GPU and
bf16-mixed when there is one):

1. each teacher of the chosen pairs, CE on the standard recipe, one seed
   (``experiment=cifar100_teacher_<teacher>``) -> ``OUT/teachers/<experiment>/``;
2. every pair x method x seed (``experiment=cifar100_<teacher>_<student>``, the teacher from
   step 1 as ``teacher.ckpt``) -> ``OUT/pairs/<experiment>/<method>-seed<k>/``;
3. ``kdlab report`` over the pairs and the teachers (report.md / .csv / .html with the
   calibration plots), then ``OUT/table.md``: the README table's rows with the published
   numbers and the kdlab columns (top-1 % on the test set, mean ± std over the seeds, each
   run's checkpoint selected on the clean validation split, never on the test set).

Resumable: a run directory holding results.json is finished and skipped; every other job is
started with ``resume=true``, which continues an interrupted run from its last epoch-end
checkpoint (or starts it afresh when it has none). Start the same command again after a
crash or a preemption. ``--epochs N`` shortens the recipe (milestones scaled to the same
fractions); ``--teacher-arch`` / ``--student-arch`` replace the architectures (for a quick
check on small hardware); overrides after ``--`` go to every run (e.g. ``trainer=gpu``,
``hydra/launcher=joblib`` to run jobs in parallel on a many-GPU machine).
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

# The README table's rows, in its order (teacher, student).
TABLE_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
               ("resnet32x4", "shufflenetv2")]
TABLE_METHODS = ["ce", "kd", "dkd"]      # the kdlab columns of the table
PUBLISHED = [("teacher", "teacher"), ("student_ce", "student CE"), ("kd", "KD"),
             ("fitnet", "FitNet"), ("crd", "CRD"), ("dkd", "DKD")]

# CIFAR-100 with kdlab's split: 10% of the 50,000 training images are the clean meta /
# validation split; the test set (10,000) is evaluated twice at the end (last and best).
TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES, BATCH = 45_000, 5_000, 10_000, 64
# Assumed GPU speed for --dry-run (not measured: no GPU where this was written); see
# --gpu-tflops and --min-step-ms, and the first-epoch estimate every run prints.
GPU_TFLOPS, MIN_STEP_MS = 25.0, 12.0

Runner = Callable[[list[str]], int]


@dataclass
class Pair:
    teacher: str
    student: str

    @property
    def experiment(self) -> str:
        return f"cifar100_{self.teacher}_{self.student}"

    @property
    def teacher_experiment(self) -> str:
        return f"cifar100_teacher_{self.teacher}"

    @property
    def label(self) -> str:
        return f"{self.teacher} -> {self.student}"


@dataclass
class Job:
    """One run: a teacher (method ce on the teacher experiment) or a student of a pair."""
    experiment: str
    method: str
    seed: int
    run_dir: Path
    arch: str                 # the trained model
    teacher_arch: str | None  # the teacher it reads (None: none)

    @property
    def status(self) -> str:
        if (self.run_dir / "results.json").is_file():
            return "finished"
        if (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            return "unfinished"
        return "new"


# -- what is there ------------------------------------------------------------------------


def experiment_dir() -> Path:
    from kdlab.config import conf_dir

    return conf_dir() / "experiment"


def pair_of(path: Path) -> Pair | None:
    """The (teacher, student) a pair experiment's defaults choose."""
    chosen = {}
    for entry in OmegaConf.load(path).get("defaults") or []:
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            for key, value in dict(entry).items():
                chosen[str(key).replace("override ", "").strip("/ ")] = str(value)
    if "teacher" in chosen and "student" in chosen:
        return Pair(chosen["teacher"], chosen["student"])
    return None


def available_pairs() -> list[Pair]:
    """Every cifar100_<teacher>_<student> experiment: the table's rows first, in order."""
    found = [p for path in sorted(experiment_dir().glob("cifar100_*.yaml"))
             if (p := pair_of(path)) is not None and path.stem == p.experiment]
    order = {pair: i for i, pair in enumerate(TABLE_PAIRS)}
    return sorted(found, key=lambda p: order.get((p.teacher, p.student), len(order)))


def select_pairs(names: list[str] | None) -> list[Pair]:
    pairs = available_pairs()
    if not names:
        return [p for p in pairs if (p.teacher, p.student) in TABLE_PAIRS]
    by_name = {}
    for p in pairs:
        for name in (f"{p.teacher}-{p.student}", f"{p.teacher}->{p.student}", p.experiment,
                     f"{p.teacher}_{p.student}"):
            by_name[name] = p
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"reproduce: error: unknown pair {unknown[0]!r}; pairs: "
                         + ", ".join(f"{p.teacher}-{p.student}" for p in pairs))
    return [by_name[n] for n in names]


def published(pair: Pair) -> dict:
    node = OmegaConf.load(experiment_dir() / f"{pair.experiment}.yaml").get("published")
    return dict(node) if node else {}


@cache
def needs_teacher(method: str) -> bool:
    from kdlab.config import conf_dir, import_target

    path = conf_dir() / "method" / f"{method}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
        raise SystemExit(f"reproduce: error: unknown method {method!r}; methods: "
                         + ", ".join(names))
    return bool(import_target(OmegaConf.load(path)._target_, f"method {method}").needs_teacher)


def recipe() -> dict:
    return OmegaConf.to_container(
        OmegaConf.load(experiment_dir() / "cifar100_recipe.yaml").dataset.recipe)


# -- the plan -----------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> tuple[list[Job], list[Job]]:
    teachers, students = {}, []
    for pair in args.pairs:
        t_arch = args.teacher_arch or pair.teacher
        teachers[pair.teacher_experiment] = Job(
            pair.teacher_experiment, "ce", args.teacher_seed,
            args.out / "teachers" / pair.teacher_experiment, t_arch, None)
        for method in args.methods:
            for seed in args.seeds:
                students.append(Job(pair.experiment, method, seed,
                                    args.out / "pairs" / pair.experiment / f"{method}-seed{seed}",
                                    args.student_arch or pair.student,
                                    t_arch if needs_teacher(method) else None))
    return list(teachers.values()), students


def epoch_overrides(epochs: int | None) -> list[str]:
    """The recipe shortened to ``epochs``, its milestones at the same fractions."""
    if not epochs:
        return []
    r = recipe()
    milestones = [max(1, round(m * epochs / r["max_epochs"])) for m in r["milestones"]]
    return [f"dataset.recipe.max_epochs={epochs}",
            f"dataset.recipe.milestones=[{','.join(map(str, milestones))}]"]


def quote(value: str | Path) -> str:
    """A value for a Hydra override, quoted when it holds characters Hydra's grammar reads
    (a path with ',' or '=' or spaces stays one value)."""
    text = str(value)
    if re.fullmatch(r"[\w/.\-~+@:]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def common_overrides(args: argparse.Namespace) -> list[str]:
    out = epoch_overrides(args.epochs)
    if args.data_dir:
        out.append(f"paths.data_dir={quote(args.data_dir.resolve())}")
    return out + list(args.overrides)


def teacher_command(jobs: list[Job], args: argparse.Namespace) -> list[str]:
    overrides = [f"experiment={','.join(j.experiment for j in jobs)}",
                 f"seed={args.teacher_seed}", "resume=true"]
    if args.teacher_arch:
        overrides.append(f"student={args.teacher_arch}")
    return ["train", "-m", *overrides, *common_overrides(args),
            f"hydra.sweep.dir={quote((args.out / 'teachers').resolve())}",
            "hydra.sweep.subdir=${hydra.runtime.choices.experiment}"]


def student_commands(jobs: list[Job], args: argparse.Namespace) -> list[list[str]]:
    """One multirun per pair and set of seeds still to run (methods sharing it together)."""
    by_pair: dict[str, dict[tuple[int, ...], list[str]]] = {}
    seeds_of: dict[tuple[str, str], list[int]] = {}
    for job in jobs:
        seeds_of.setdefault((job.experiment, job.method), []).append(job.seed)
    for (experiment, method), seeds in seeds_of.items():
        by_pair.setdefault(experiment, {}).setdefault(tuple(seeds), []).append(method)
    commands = []
    for experiment, groups in by_pair.items():
        pair = next(p for p in args.pairs if p.experiment == experiment)
        teacher = args.out / "teachers" / pair.teacher_experiment / "checkpoints" / "best.ckpt"
        for seeds, methods in groups.items():
            overrides = [f"experiment={experiment}", f"method={','.join(methods)}",
                         f"seed={','.join(map(str, seeds))}", "resume=true",
                         f"teacher.ckpt={quote(teacher.resolve())}"]
            if args.teacher_arch:
                overrides.append(f"teacher={args.teacher_arch}")
            if args.student_arch:
                overrides.append(f"student={args.student_arch}")
            sweep_dir = (args.out / "pairs" / experiment).resolve()
            commands.append(["train", "-m", *overrides, *common_overrides(args),
                             f"hydra.sweep.dir={quote(sweep_dir)}",
                             "hydra.sweep.subdir=${hydra.runtime.choices.method}-seed${seed}"])
    return commands


# -- the estimate -------------------------------------------------------------------------


@cache
def forward_flops(arch: str, num_classes: int = 100, side: int = 32) -> int:
    """FLOPs of one ``side`` x ``side`` image (32x32) through ``arch`` (``num_classes``
    100), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdlab.models import build_model

    model = build_model(arch, num_classes, (3, side, side)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    return int(counter.get_total_flops())


def epoch_seconds(job: Job, args: argparse.Namespace) -> float:
    """Assumed GPU seconds of one epoch: training (3x the model's forward FLOPs, + the
    teacher's forward) at --gpu-tflops but at least --min-step-ms per step, + validation."""
    per_image = 3 * forward_flops(job.arch) + (forward_flops(job.teacher_arch)
                                               if job.teacher_arch else 0)
    rate = args.gpu_tflops * 1e12
    steps = TRAIN_IMAGES // BATCH
    train = max(TRAIN_IMAGES * per_image / rate, steps * args.min_step_ms / 1000)
    return train + VAL_IMAGES * forward_flops(job.arch) / rate


def run_hours(job: Job, args: argparse.Namespace) -> float:
    epochs = args.epochs or recipe()["max_epochs"]
    test = 2 * TEST_IMAGES * (forward_flops(job.arch) + (forward_flops(job.teacher_arch)
                                                         if job.teacher_arch else 0))
    return (epochs * epoch_seconds(job, args) + test / (args.gpu_tflops * 1e12)) / 3600


def describe(teachers: list[Job], students: list[Job], args: argparse.Namespace) -> str:
    epochs = args.epochs or recipe()["max_epochs"]
    lines = [f"CIFAR-100 reproduction plan: {len(args.pairs)} pairs x "
             f"{len(args.methods)} methods ({','.join(args.methods)}) x {len(args.seeds)} "
             f"seeds ({','.join(map(str, args.seeds))}), {epochs} epoch{'s' if epochs != 1 else ''}"
             f", into {args.out}", "",
             f"{'run':<44} {'runs':>4} {'to run':>6} {'s/epoch':>8} {'GPU h':>7}"]
    todo_hours = 0.0
    rows: dict[str, list[Job]] = {}
    for job in teachers:
        rows.setdefault(f"teacher {job.arch} (CE, seed {job.seed})", []).append(job)
    labels = {p.experiment: p.label for p in args.pairs}
    for job in students:
        rows.setdefault(f"{labels[job.experiment]}: {job.method}", []).append(job)
    for label, jobs in rows.items():
        todo = [j for j in jobs if j.status != "finished"]
        hours = sum(run_hours(j, args) for j in todo)
        todo_hours += hours
        lines.append(f"{label:<44} {len(jobs):>4} {len(todo):>6} "
                     f"{epoch_seconds(jobs[0], args):>8.1f} {hours:>7.1f}")
    finished = [j for j in teachers + students if j.status == "finished"]
    unfinished = [j for j in teachers + students if j.status == "unfinished"]
    lines += ["", f"total: {len(teachers)} teacher runs + {len(students)} student runs; "
                  f"{len(finished)} finished (skipped), {len(unfinished)} to resume, "
                  f"{len(teachers) + len(students) - len(finished) - len(unfinished)} new; "
                  f"estimated {todo_hours:.1f} GPU hours to go "
                  f"({todo_hours / 24:.1f} days on one GPU)",
              f"assumption per epoch: {TRAIN_IMAGES:,} training images of 32x32 at "
              f"{args.gpu_tflops:g} TFLOP/s effective (3x the model's forward FLOPs, + the "
              f"teacher's forward for methods that read one; FLOPs counted with "
              f"torch.utils.flop_counter), at least {args.min_step_ms:g} ms per step of "
              f"{BATCH}, + {VAL_IMAGES:,} validation images. An assumption for one "
              "A100-class GPU in bf16, not a measurement: every run prints its first "
              "epoch's time and an estimate of its whole run; calibrate with --gpu-tflops "
              "and --min-step-ms."]
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------------


def subprocess_runner(args: list[str]) -> int:
    """``kdlab ARGS`` in its own process (one per multirun), output to the console."""
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args]).returncode


def show(command: list[str]) -> str:
    return "kdlab " + " ".join(shlex.quote(a) for a in command)


def run_all(teachers: list[Job], students: list[Job], args: argparse.Namespace,
            kdlab: Runner) -> list[str]:
    """Run what is not finished; the commands that failed."""
    failed = []
    todo = [j for j in teachers if j.status != "finished"]
    if todo:
        command = teacher_command(todo, args)
        print(f"\n== teachers: {show(command)}", flush=True)
        if kdlab(command) != 0:
            failed.append(show(command))
    ready = {j.experiment for j in teachers if j.status == "finished"}
    pending = []
    for job in students:
        if job.status == "finished":
            continue
        pair = next(p for p in args.pairs if p.experiment == job.experiment)
        if job.teacher_arch and pair.teacher_experiment not in ready:
            continue  # its teacher failed: reported below, not run against a missing file
        pending.append(job)
    for command in student_commands(pending, args):
        print(f"\n== students: {show(command)}", flush=True)
        if kdlab(command) != 0:
            failed.append(show(command))
    return failed


# -- the table ----------------------------------------------------------------------------


def read_report(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def percent(mean: str, std: str, n: str) -> str:
    if not mean:
        return ""
    text = f"{100 * float(mean):.2f}"
    return text + (f" ± {100 * float(std):.2f}" if std and int(float(n)) > 1 else "")


def table(args: argparse.Namespace) -> str:
    """The README table's rows: published numbers and the kdlab columns from the reports."""
    rows = {(r["experiment"], r["method"]): r
            for r in read_report(args.out / "pairs" / "report.csv")}
    teachers = {r["experiment"]: r for r in read_report(args.out / "teachers" / "report.csv")}
    head = (["teacher -> student"] + [f"published {name}" for _, name in PUBLISHED]
            + ["kdlab teacher"] + [f"kdlab {m.upper() if m != 'fitnet' else 'FitNet'}"
                                   for m in args.methods] + ["seeds"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair in args.pairs:
        numbers = published(pair)
        teacher = teachers.get(pair.teacher_experiment, {})
        cells = [pair.label] + [f"{numbers[key]:.2f}" if key in numbers else ""
                                for key, _ in PUBLISHED]
        cells.append(percent(teacher.get("test.acc_mean", ""), "", "1"))
        seeds = set()
        for method in args.methods:
            row = rows.get((pair.experiment, method), {})
            cells.append(percent(row.get("test.acc_mean", ""), row.get("test.acc_std", ""),
                                 row.get("test.acc_n", "0") or "0"))
            seeds |= set(filter(None, row.get("seeds", "").split(",")))
        cells.append(",".join(sorted(seeds, key=int)))
        lines.append("| " + " | ".join(cells) + " |")
    swapped = []
    if args.teacher_arch:
        swapped.append(f"teachers replaced by {args.teacher_arch}")
    if args.student_arch:
        swapped.append(f"students replaced by {args.student_arch}")
    epochs = args.epochs or recipe()["max_epochs"]
    notes = [f"Top-1 % on the CIFAR-100 test set. kdlab columns: mean ± sample std over the "
             f"seeds listed, {epochs} epoch{'s' if epochs != 1 else ''}; each run's checkpoint "
             "is the epoch with the best accuracy on the clean validation split (10% of the "
             "training set held out), never the test set. kdlab teacher: the teacher each pair "
             "distils from (one CE run). Published: CRD (Tian et al. 2020) and DKD (Zhao et "
             "al. 2022), selected differently."]
    if swapped:
        notes.append("Not the published architectures: " + "; ".join(swapped) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_reports(args: argparse.Namespace, kdlab: Runner) -> Path:
    metrics = "test.acc,test.ece,test_last.acc,test_last.ece"
    for part, by, extra in (("teachers", "experiment", ""),
                            ("pairs", "experiment,method", ",teacher.acc")):
        if (args.out / part).is_dir():
            kdlab(["report", str(args.out / part), "--by", by, "--metric", metrics + extra,
                   "--html"])
    path = args.out / "table.md"
    path.write_text(table(args))
    return path


# -- the command --------------------------------------------------------------------------


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="reproduce_cifar100.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides after -- go to every kdlab train run.")
    parser.add_argument("--out", type=Path, default=Path("reproduce/cifar100"),
                        help="where runs, reports and table.md go (default: %(default)s)")
    parser.add_argument("--pairs", type=_list, default=None,
                        help="teacher-student pairs, e.g. resnet32x4-resnet8x4,vgg13-vgg8 "
                             "(default: the README table's seven)")
    parser.add_argument("--methods", type=_list, default=TABLE_METHODS,
                        help="methods (default: %(default)s)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in _list(t)],
                        default=[0, 1, 2], help="student seeds (default: 0,1,2)")
    parser.add_argument("--teacher-seed", type=int, default=0,
                        help="the seed of each teacher's one run (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="shorten the recipe to N epochs, milestones scaled (default: "
                             "the recipe's 240)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where CIFAR-100 is or is downloaded to (paths.data_dir; default "
                             "$KDLAB_DATA_DIR or ~/.cache/kdlab/data)")
    parser.add_argument("--teacher-arch", default=None,
                        help="train this architecture as every teacher (quick checks)")
    parser.add_argument("--student-arch", default=None,
                        help="train this architecture as every student (quick checks)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, its commands and estimated GPU hours; run nothing")
    parser.add_argument("--gpu-tflops", type=float, default=GPU_TFLOPS,
                        help="assumed effective TFLOP/s for the estimate (default: %(default)s)")
    parser.add_argument("--min-step-ms", type=float, default=MIN_STEP_MS,
                        help="assumed least time of a training step, ms (default: %(default)s)")
    args = parser.parse_args(argv)
    args.overrides = overrides
    args.pairs = select_pairs(args.pairs)
    for method in args.methods:
        needs_teacher(method)  # an unknown method is an error before anything runs
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None, kdlab: Runner = subprocess_runner) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    teachers, students = plan(args)
    print(describe(teachers, students, args), flush=True)
    if args.dry_run:
        todo = [j for j in teachers if j.status != "finished"]
        commands = ([teacher_command(todo, args)] if todo else []) + student_commands(
            [j for j in students if j.status != "finished"], args)
        print("\ncommands:" + "".join(f"\n  {show(c)}" for c in commands))
        return 0
    failed = run_all(teachers, students, args, kdlab)
    path = write_reports(args, kdlab)
    print("\n" + path.read_text())
    print(f"wrote {path} (runs, report.md/.csv/.html under {args.out}/pairs and /teachers)")
    missing = [j for j in teachers + students if j.status != "finished"]
    if failed or missing:
        print(f"\nreproduce: {len(missing)} runs not finished; failed commands:\n  "
              + "\n  ".join(failed or ["(none)"]) + "\nstart the same command again to "
              "resume them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
