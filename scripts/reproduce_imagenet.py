"""Run the ImageNet KD recipes (conf/experiment/imagenet_*.yaml) on GPUs, or print their plan.

    python scripts/reproduce_imagenet.py --dry-run      # the plan and its estimated GPU hours
    python scripts/reproduce_imagenet.py --train chunks/imagenet-train \\
        --val chunks/imagenet-val --gpus 8 [--methods ce,kd] [--seeds 0] [-- overrides]

The data are the chunks of ``kdlab data prepare`` (docs/data.md): ImageNet's train/ and its
val/ sorted into class folders, each prepared once. The teachers are torchvision's
pretrained ResNet-34 and ResNet-50 (``teacher.ckpt=tv:...``: downloaded once by torchvision),
so no teacher is trained. Each pair x method x seed is one ``kdlab train
experiment=imagenet_<teacher>_<student>`` run in ``OUT/<experiment>/<method>-seed<k>/``,
one after another, each on ``--gpus`` GPUs (``trainer=ddp`` when more than one, the
recipe's batch of 512 split over them). A run directory holding results.json is skipped;
every other run starts with ``resume=true`` (continuing an interrupted run from its last
epoch-end checkpoint): start the same command again after a crash or a preemption. Then
``kdlab report OUT --by experiment,method``. Overrides after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's helpers
from reproduce_cifar100 import (  # noqa: E402
    Runner,
    _list,
    needs_teacher,
    quote,
    show,
    subprocess_runner,
)
from reproduce_cifar100 import forward_flops as counted_flops  # noqa: E402

EXPERIMENTS = ["imagenet_resnet34_resnet18", "imagenet_resnet50_mobilenetv1"]
# ILSVRC-2012: training images (all 1000 classes) and the 50,000 val images (the test split)
TRAIN_IMAGES, TEST_IMAGES, SIDE = 1_281_167, 50_000, 224
# Assumed per-GPU speed for --dry-run (not measured: no GPU where this was written):
# effective bf16 TFLOP/s of an A100-class GPU on these convnets, and the most images/s one
# GPU's input pipeline delivers (nvJPEG decode + crops).
GPU_TFLOPS, MAX_IMAGES_PER_S = 50.0, 3000.0

@dataclass
class Job:
    experiment: str
    method: str
    seed: int
    run_dir: Path
    student: str          # conf/model names
    teacher: str | None   # None: the method reads no teacher

    @property
    def status(self) -> str:
        if (self.run_dir / "results.json").is_file():
            return "finished"
        if (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            return "unfinished"
        return "new"


@cache
def experiment_config(name: str) -> dict:
    """The experiment composed (no data path needed to read it)."""
    from kdlab.config import compose

    return OmegaConf.to_container(compose([f"experiment={name}"]), resolve=True)


def forward_flops(arch: str) -> int:
    """FLOPs of one 224x224 image through ``arch`` (1000 classes), counted by torch."""
    return counted_flops(arch, 1000, SIDE)


def plan(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for name in args.experiments:
        cfg = experiment_config(name)
        for method in args.methods:
            for seed in args.seeds:
                jobs.append(Job(name, method, seed, args.out / name / f"{method}-seed{seed}",
                                cfg["choices"]["student"],
                                cfg["choices"]["teacher"] if needs_teacher(method) else None))
    return jobs


def epochs_of(args: argparse.Namespace) -> int:
    return args.epochs or experiment_config(args.experiments[0])["dataset"]["recipe"][
        "max_epochs"]


def train_images(name: str) -> int:
    """Images trained on per epoch: ImageNet's train set less the held-out meta and val."""
    dataset = experiment_config(name)["dataset"]
    return round(TRAIN_IMAGES * (1 - dataset["meta_fraction"] - dataset["val_fraction"]))


def run_gpu_hours(job: Job, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds of one epoch on all --gpus, GPU hours of the run): training at 3x the
    student's forward FLOPs + the teacher's forward per image, at --gpu-tflops per GPU but at
    most --max-images-per-s per GPU; held-out validation every epoch; the test set twice."""
    student = forward_flops(job.student)
    teacher = forward_flops(job.teacher) if job.teacher else 0
    rate = args.gpu_tflops * 1e12 * args.gpus
    most = args.max_images_per_s * args.gpus
    n = train_images(job.experiment)
    held_out = TRAIN_IMAGES - n
    epoch = max(n * (3 * student + teacher) / rate, n / most) + held_out * student / rate
    test = 2 * TEST_IMAGES * (student + teacher) / rate
    return epoch, (epochs_of(args) * epoch + test) * args.gpus / 3600


def describe(jobs: list[Job], args: argparse.Namespace) -> str:
    epochs = epochs_of(args)
    lines = [f"ImageNet reproduction plan: {len(args.experiments)} pairs x {len(args.methods)} "
             f"methods ({','.join(args.methods)}) x {len(args.seeds)} seeds "
             f"({','.join(map(str, args.seeds))}), {epochs} epochs, on {args.gpus} GPU(s) per "
             f"run, into {args.out}", "",
             f"{'run':<48} {'images/epoch':>12} {'status':>10} {'min/epoch':>9} {'GPU h':>7}"]
    todo_hours = 0.0
    for job in jobs:
        epoch, hours = run_gpu_hours(job, args)
        if job.status != "finished":
            todo_hours += hours
        label = f"{job.experiment} {job.method} seed {job.seed}"
        lines.append(f"{label:<48} {train_images(job.experiment):>12,} {job.status:>10} "
                     f"{epoch / 60:>9.1f} {hours:>7.1f}")
    finished = sum(j.status == "finished" for j in jobs)
    lines += ["", f"total: {len(jobs)} runs, {finished} finished (skipped); estimated "
                  f"{todo_hours:.0f} GPU hours to go ({todo_hours / args.gpus / 24:.1f} days "
                  f"on {args.gpus} GPU(s))",
              f"assumption: per epoch {TRAIN_IMAGES:,} ImageNet train images less the held-out "
              f"meta and val splits, at {SIDE}x{SIDE}; per image 3x the student's forward "
              "FLOPs + the teacher's forward (FLOPs counted with torch.utils.flop_counter) at "
              f"{args.gpu_tflops:g} TFLOP/s effective per GPU, but at most "
              f"{args.max_images_per_s:g} images/s per GPU (the input pipeline); + the held-out "
              f"images once per epoch and the {TEST_IMAGES:,} val images twice at the end. An "
              "assumption for A100-class GPUs in bf16, not a measurement: every run prints "
              "its first epoch's time; calibrate with --gpu-tflops and --max-images-per-s."]
    return "\n".join(lines)


def command(job: Job, args: argparse.Namespace) -> list[str]:
    data = [f"dataset.path={quote(args.train or 'TRAIN_CHUNKS')}",
            f"dataset.test_path={quote(args.val or 'VAL_CHUNKS')}"]
    devices = []
    if args.gpus > 1:
        devices = ["trainer=ddp", "trainer.accelerator=gpu", f"trainer.devices={args.gpus}",
                   f"dataset.batch_size={512 // args.gpus}"]
    epochs = []
    if args.epochs:
        recipe = experiment_config(job.experiment)["dataset"]["recipe"]
        milestones = [max(1, round(m * args.epochs / recipe["max_epochs"]))
                      for m in recipe["milestones"]]
        epochs = [f"dataset.recipe.max_epochs={args.epochs}",
                  f"dataset.recipe.milestones=[{','.join(map(str, milestones))}]"]
    return ["train", f"experiment={job.experiment}", f"method={job.method}", f"seed={job.seed}",
            *data, *devices, *epochs, "resume=true",
            f"hydra.run.dir={quote(job.run_dir.resolve())}", *args.overrides]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="reproduce_imagenet.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides after -- go to every kdlab train run.")
    parser.add_argument("--train", default=None,
                        help="the prepared ImageNet train chunks (dataset.path; a URL too)")
    parser.add_argument("--val", default=None,
                        help="the prepared ImageNet val chunks (dataset.test_path)")
    parser.add_argument("--out", type=Path, default=Path("reproduce/imagenet"),
                        help="where runs and the report go (default: %(default)s)")
    parser.add_argument("--experiments", type=_list, default=EXPERIMENTS,
                        help="default: %(default)s")
    parser.add_argument("--methods", type=_list, default=["kd"], help="default: kd")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in _list(t)], default=[0],
                        help="default: 0")
    parser.add_argument("--epochs", type=int, default=None,
                        help="shorten the recipe to N epochs, milestones scaled (default 100)")
    parser.add_argument("--gpus", type=int, default=8,
                        help="GPUs per run on this node (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, its commands and estimated GPU hours; run nothing")
    parser.add_argument("--gpu-tflops", type=float, default=GPU_TFLOPS,
                        help="assumed effective TFLOP/s per GPU (default: %(default)s)")
    parser.add_argument("--max-images-per-s", type=float, default=MAX_IMAGES_PER_S,
                        help="assumed most images/s per GPU (default: %(default)s)")
    args = parser.parse_args(argv)
    args.overrides = overrides
    unknown = [e for e in args.experiments if e not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r}; experiments: {', '.join(EXPERIMENTS)}")
    for method in args.methods:
        needs_teacher(method)  # an unknown method is an error before anything runs
    if args.gpus < 1 or 512 % args.gpus:
        parser.error(f"--gpus must divide the recipe's batch of 512, got {args.gpus}")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not args.dry_run and not (args.train and args.val):
        parser.error("--train and --val (the prepared chunks) are required to run")
    return args


def main(argv: Sequence[str] | None = None, kdlab: Runner = subprocess_runner) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    jobs = plan(args)
    print(describe(jobs, args), flush=True)
    todo = [j for j in jobs if j.status != "finished"]
    if args.dry_run:
        print("\ncommands:" + "".join(f"\n  {show(command(j, args))}" for j in todo))
        return 0
    failed = [show(command(j, args)) for j in todo if kdlab(command(j, args)) != 0]
    kdlab(["report", str(args.out), "--by", "experiment,method", "--metric",
           "test.acc,test.acc_top5,test.ece,test_last.acc"])
    if failed:
        print("\nreproduce: failed runs (start the same command again to resume them):\n  "
              + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
