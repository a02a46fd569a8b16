"""Throughput of kdlab against the classic CIFAR KD training loop, measured side by side.

    .venv/bin/python scripts/bench.py [--train 1280] [--epochs 5] [--out scripts/results/bench.json]
    .venv/bin/python scripts/bench.py --streaming [--train 512] [--epochs 3] [--workers 2]

All measurements use resnet32x4 -> resnet8x4 on CIFAR-shaped data this script generates
(100 classes, 32x32x3 uint8), batch 64, SGD(lr 0.05, momentum 0.9, wd 5e-4), and run one
after another in fresh processes (so each peak memory is its own):

- reference: the loop of the classic CIFAR KD repositories: a torchvision-style dataset that
  turns each uint8 array into a PIL image and applies RandomCrop(32, 4) +
  RandomHorizontalFlip + ToTensor + Normalize per sample in DataLoader workers, fp32, the
  teacher's forward every step, KD loss, SGD;
- kdlab kd / ce / alm_kd: `kdlab train` on the same data (the real cifar100 datamodule
  reading generated files), default settings (``trainer.precision=auto``: bf16 autocast
  where the CPU has native bf16); alm_kd's time per epoch is averaged over a window of
  `meta_every` (10) epochs containing one meta pass, whose teacher logits come from the
  cache built once before training (its one-time cost is a column of the table);
- kdlab kd / ce with a deterministic transform (dataset.augment=false), where kd reads the
  per-example teacher logits cache;
- kdlab kd in fp32 (trainer.precision=32-true): the like-for-like ratio on any CPU.

``--streaming`` measures the data paths instead, on one set of generated images held both
as the CIFAR-100 files (the in-memory path) and as a class-per-folder tree of JPEGs (quality
95) with its ``kdlab data prepare`` chunks: the train split's loader alone (batches as the
model gets them: decoded, cropped, normalised) for the in-memory datamodule, dataset=
imagefolder and dataset=streaming (decoded in ``--workers`` loader workers, and in the main
process as ``decode=device`` does on a GPU), then KD and CE training on the in-memory and
the streaming paths (32x32 crops: RandomResizedCrop for the JPEG paths, pad-crop for CIFAR).

It prints a table and writes it as JSON. Ratios are what matter: absolute images/s depend
on the machine. Each run's speed is its fastest timed epoch. The model-FLOP utilisation
divides achieved model FLOP/s by the best large matmul this machine does in the same run
(fp32, or bf16 for bf16 rows) -- stated in the output.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
BATCH = 64


def write_cifar100_folder(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images in the CIFAR-100 python format (the files kdlab's datamodule reads)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100)
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))


def kd_loss(s, t, y):
    """KD as every loop here computes it: 0.1 CE + 0.9 T^2 KL, T = 4."""
    import torch.nn.functional as F

    kl = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), reduction="batchmean",
                  log_target=True)
    return 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * kl


def kdlab_train_rows(data_root: str):
    """As many uint8 images and labels as kdlab trains on (80 %: 10 % meta, 10 % val held
    out): the first rows of the generated set (random images, so any rows will do)."""
    import torch

    from kdlab.data.cifar import read_cifar_batch

    raw = read_cifar_batch(Path(data_root) / "cifar-100-python" / "train")
    n = len(raw["fine_labels"]) * 8 // 10
    return (torch.from_numpy(raw["data"].reshape(-1, 3, 32, 32))[:n],
            torch.tensor(raw["fine_labels"])[:n])


# -- the classic loop ------------------------------------------------------------------------


class ClassicCIFAR:
    """torchvision's CIFAR dataset shape: HWC uint8 arrays, a PIL image and transforms per item."""

    def __init__(self, data_root: str):
        from torchvision import transforms

        images, labels = kdlab_train_rows(data_root)  # as many images as kdlab trains on
        self.images = images.numpy().transpose(0, 2, 3, 1)
        self.labels = labels.tolist()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_loop(data_root: str, teacher_ckpt: str, epochs: int, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from kdlab.models import build_model

    loader = DataLoader(ClassicCIFAR(data_root), batch_size=BATCH, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    teacher = build_model("resnet32x4", 100)
    teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True))
    teacher.eval()
    student = build_model("resnet8x4", 100)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    per_epoch = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for x, y in loader:
            with torch.no_grad():
                t = teacher(x)
            loss = kd_loss(student(x), t, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        per_epoch.append((n, time.perf_counter() - start))
    return {"epoch_images": [n for n, _ in per_epoch],
            "epoch_seconds": [round(s, 3) for _, s in per_epoch]}


# -- a hand-written loop with kdlab's tricks ---------------------------------------------------


def hand_loop(data_root: str, teacher_ckpt: str, epochs: int, bf16: bool) -> dict:
    """KD without Lightning or kdlab's module, with the same tricks: uint8 images in memory,
    batched crop + flip on the device, bf16 autocast, channels_last, the teacher under
    inference_mode. The framework's own overhead is kdlab's speed over this one."""
    import contextlib

    import torch

    from kdlab.data.augment import normalize, random_crop_flip
    from kdlab.models import build_model

    images, labels = kdlab_train_rows(data_root)
    n = len(labels)
    cl = torch.channels_last
    teacher = build_model("resnet32x4", 100)
    teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True))
    teacher = teacher.to(memory_format=cl).eval()
    student = build_model("resnet8x4", 100).to(memory_format=cl).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else \
        contextlib.nullcontext
    per_epoch = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for idx in torch.randperm(n).split(BATCH):
            if len(idx) < BATCH:
                continue
            x = normalize(random_crop_flip(images[idx]), MEAN, STD).contiguous(memory_format=cl)
            y = labels[idx]
            with autocast():
                with torch.inference_mode():
                    t = teacher(x)
                t = t.float().clone()
                loss = kd_loss(student(x).float(), t, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        per_epoch.append((seen, time.perf_counter() - start))
    return {"epoch_images": [n for n, _ in per_epoch],
            "epoch_seconds": [round(s, 3) for _, s in per_epoch],
            "precision": "bf16-mixed" if bf16 else "32-true"}


def teacher_pass(data_root: str, teacher_ckpt: str, bf16: bool, repeats: int = 3) -> dict:
    """Seconds of one teacher-only pass over the train split (the best of ``repeats``), as
    the view-cache build runs it: eval batches, inference_mode, channels_last."""
    import contextlib

    import torch

    from kdlab.data.augment import normalize, random_crop_flip
    from kdlab.models import build_model

    images, _ = kdlab_train_rows(data_root)
    n = len(images)
    teacher = build_model("resnet32x4", 100)
    teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True))
    teacher = teacher.to(memory_format=torch.channels_last).eval()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else \
        contextlib.nullcontext
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for idx in torch.arange(n).split(256):
            x = normalize(random_crop_flip(images[idx]), MEAN, STD)
            with autocast(), torch.inference_mode():
                teacher(x.contiguous(memory_format=torch.channels_last))
        best = min(best, time.perf_counter() - start)
    return {"seconds": best}


# -- kdlab runs --------------------------------------------------------------------------------


def kdlab_run(overrides: list[str], out_dir: str) -> dict:
    from kdlab.config import compose
    from kdlab.pipeline import run

    results = run(compose(overrides), out_dir)
    return {**results["throughput"], "precision": results["precision"]}


def _job(fn, args, queue):
    if sys.platform == "linux":
        # a spawned process makes spawn its children's default too: loader workers would
        # re-import torch at every epoch, which `kdlab train` (forking them) never does
        mp.set_start_method("fork", force=True)
    result = fn(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def in_fresh_process(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_job, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def model_flops_per_image() -> dict[str, float]:
    from reproduce_cifar100 import forward_flops  # a sibling script: the same FLOP count

    return {name: float(forward_flops(name)) for name in ("resnet8x4", "resnet32x4")}


def measured_peak_flops(dtype_name: str, n: int = 2048, reps: int = 20) -> float:
    """The best FLOP/s of an n x n matmul in ``dtype_name`` on this machine, right now."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def best_epoch_speed(row: dict) -> float:
    """Images/s of the fastest timed epoch (the first is warm-up). On a shared machine an
    epoch is only ever slowed down by others, so the fastest is the least disturbed."""
    timed = list(zip(row["epoch_images"], row["epoch_seconds"], strict=True))[1:]
    return max(n / s for n, s in timed)


# -- the data paths (--streaming) ------------------------------------------------------------


def write_jpeg_trees(data_root: Path, tree: Path) -> None:
    """The generated CIFAR-100 images as class-per-folder JPEG trees (train/ and test/)."""
    import torch
    from torchvision.io import encode_jpeg

    from kdlab.data.cifar import read_cifar_batch

    for split in ("train", "test"):
        raw = read_cifar_batch(data_root / "cifar-100-python" / split)
        images = raw["data"].reshape(-1, 3, 32, 32)
        for i, (image, label) in enumerate(zip(images, raw["fine_labels"], strict=True)):
            folder = tree / split / f"class{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = encode_jpeg(torch.from_numpy(image.copy()), quality=95)
            (folder / f"img{i:05d}.JPEG").write_bytes(bytes(data.numpy()))


def loader_speed(overrides: list[str], epochs: int) -> dict:
    """Images/s of the train split's batches as the model gets them (loader + decode + views
    + normalisation, no model), the fastest of ``epochs`` passes after a warm-up pass."""
    import torch

    from kdlab.config import compose
    from kdlab.data import instantiate_datamodule

    torch.set_num_threads(1)
    dm = instantiate_datamodule(compose(overrides))
    dm.check()
    dm.setup()
    loader = dm.train_dataloader()
    per_epoch = []
    for epoch in range(epochs + 1):
        if hasattr(loader, "epoch_of"):
            loader.epoch_of = lambda e=epoch: e
        else:
            loader.sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for raw in loader:
            n += len(dm.model_batch(raw, "cpu", train=True)["target"])
        per_epoch.append((n, time.perf_counter() - start))
    return {"epoch_images": [n for n, _ in per_epoch],
            "epoch_seconds": [round(s, 3) for _, s in per_epoch], "precision": "-"}


def streaming_main(args) -> None:
    import torch

    from kdlab.data.prepare import prepare
    from kdlab.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="kdlab-bench-streaming-"))
    write_cifar100_folder(tmp / "data", args.train, 128)
    write_jpeg_trees(tmp / "data", tmp / "tree")
    start = time.perf_counter()
    for split in ("train", "test"):
        prepare(tmp / "tree" / split, tmp / "chunks" / split, workers=args.workers,
                show_progress=False)
    prepare_s = time.perf_counter() - start
    torch.manual_seed(0)
    teacher_ckpt = tmp / "resnet32x4.pt"
    torch.save(build_model("resnet32x4", 100).state_dict(), teacher_ckpt)
    os.environ["KDLAB_CACHE_DIR"] = str(tmp / "cache")
    os.environ.setdefault("WANDB_MODE", "disabled")
    memory = ["dataset=cifar100", f"dataset.root={tmp / 'data'}", "dataset.download=false",
              f"dataset.num_workers={args.workers}"]
    jpeg = ["dataset.crop_size=32", "dataset.resize_size=36", f"dataset.batch_size={BATCH}",
            f"dataset.num_workers={args.workers}"]
    folder = ["dataset=imagefolder", f"dataset.path={tmp / 'tree' / 'train'}",
              f"dataset.test_path={tmp / 'tree' / 'test'}", *jpeg]
    stream = ["dataset=streaming", f"dataset.path={tmp / 'chunks' / 'train'}",
              f"dataset.test_path={tmp / 'chunks' / 'test'}",
              f"dataset.cache_dir={tmp / 'cache' / 'streaming'}", *jpeg]
    loaders = {
        "loader: in-memory uint8 (cifar100)": [*memory, "dataset.num_workers=0"],
        f"loader: imagefolder, {args.workers} workers decode": [*folder, "dataset.decode=workers"],
        f"loader: streaming, {args.workers} workers decode": [*stream, "dataset.decode=workers"],
        "loader: streaming, main process decodes (decode=device, CPU here)":
            [*stream, "dataset.decode=device", "dataset.num_workers=0"],
    }
    model = ["student=resnet8x4", "teacher=resnet32x4", f"teacher.ckpt={teacher_ckpt}",
             "optimizer.lr=0.05", f"trainer.max_epochs={args.epochs}", "scheduler=constant",
             "trainer.enable_progress_bar=false"]
    training = {
        "kdlab kd, in-memory (cifar100)": [*memory, "dataset.num_workers=0", *model, "method=kd",
                                           f"dataset.batch_size={BATCH}"],
        f"kdlab kd, streaming ({args.workers} workers)": [*stream, *model, "method=kd"],
        "kdlab ce, in-memory (cifar100)": [*memory, "dataset.num_workers=0", *model, "method=ce",
                                           f"dataset.batch_size={BATCH}"],
        f"kdlab ce, streaming ({args.workers} workers)": [*stream, *model, "method=ce"],
    }
    rows: dict[str, dict] = {}
    for name, overrides in loaders.items():
        print(f"{name} ...", flush=True)
        rows[name] = in_fresh_process(loader_speed, overrides, args.epochs)
    for name, overrides in training.items():
        print(f"{name} ...", flush=True)
        rows[name] = in_fresh_process(kdlab_run, overrides,
                                      str(tmp / name.replace(" ", "_").replace(",", "")))
    for row in rows.values():
        row["images_per_s"] = best_epoch_speed(row)
    lines = ["| data path | precision | images/s | peak RSS MB |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {row['precision']} | {row['images_per_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} |" for name, row in rows.items()]
    lines += ["", f"The same {args.train} generated 32x32 images (train split: "
              f"{rows[next(iter(loaders))]['epoch_images'][0]} after the 10% meta and 10% val "
              f"held out; the JPEG paths read the {args.train} images as JPEGs, test from "
              f"their own tree); batch {BATCH}; `kdlab data prepare` of both trees took "
              f"{prepare_s:.1f} s with {args.workers} workers. Loader rows: batches as the "
              "model gets them, one torch thread, no model; images/s: the fastest of "
              f"{args.epochs} epochs after a warm-up. Training rows: resnet32x4 -> resnet8x4 "
              f"(kd) or resnet8x4 alone (ce), {args.epochs} epochs, the fastest after the "
              f"first; peak RSS: the measuring process (loader workers not counted); torch "
              f"{torch.__version__}, {os.cpu_count()} CPU threads."]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "prepare_s": prepare_s, "args": vars(args)},
                              indent=2))
    out.with_suffix(".md").write_text(table + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1280, help="generated training images")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per measurement (>= 4)")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--out", default=None,
                        help="default: scripts/results/bench.json (--streaming: "
                             "bench_streaming.json)")
    parser.add_argument("--streaming", action="store_true",
                        help="measure the data paths: in-memory, imagefolder, streaming")
    args = parser.parse_args(argv)
    if args.streaming:
        args.out = args.out or "scripts/results/bench_streaming.json"
        return streaming_main(args)
    args.out = args.out or "scripts/results/bench.json"
    if args.epochs < 4:
        parser.error("--epochs must be >= 4 (a warm-up epoch, plain epochs, two meta epochs)")
    import torch

    from kdlab.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
    write_cifar100_folder(tmp / "data", args.train, 128)
    torch.manual_seed(0)
    teacher_ckpt = tmp / "resnet32x4.pt"
    torch.save(build_model("resnet32x4", 100).state_dict(), teacher_ckpt)
    os.environ["KDLAB_CACHE_DIR"] = str(tmp / "cache")
    os.environ.setdefault("WANDB_MODE", "disabled")

    # meta_fraction + val_fraction make kdlab train on 80% of the images: so do the other loops.
    common = ["dataset=cifar100", f"dataset.root={tmp / 'data'}", "dataset.download=false",
              "student=resnet8x4", "teacher=resnet32x4", f"teacher.ckpt={teacher_ckpt}",
              "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.weight_decay=5e-4",
              f"dataset.batch_size={BATCH}", f"trainer.max_epochs={args.epochs}",
              "trainer.enable_progress_bar=false", "scheduler=constant"]
    jobs = {
        "kdlab kd": ["method=kd"],
        "kdlab ce": ["method=ce"],
        # meta passes in the last two epochs, plain epochs before them
        "kdlab alm_kd": ["method=alm_kd", f"method.meta_start={args.epochs - 2}",
                         "method.meta_every=1"],
        "kdlab kd, no augmentation": ["method=kd", "dataset.augment=false"],
        "kdlab ce, no augmentation": ["method=ce", "dataset.augment=false"],
        "kdlab kd, fp32": ["method=kd", "trainer.precision=32-true"],
        # every (example, crop + flip view) of the teacher's logits, built once before training
        "kdlab kd, view cache": ["method=kd", "teacher_cache=views"],
    }
    # The matmul peak, measured before and after the runs (the better of the two counts).
    first_peaks = {kind: measured_peak_flops(kind) for kind in ("fp32", "bf16")}
    rows: dict[str, dict] = {}
    print(f"reference loop ({args.workers} workers) ...", flush=True)
    rows["reference (classic loop)"] = in_fresh_process(
        reference_loop, str(tmp / "data"), str(teacher_ckpt), args.epochs, args.workers)
    rows["reference (classic loop)"]["precision"] = "32-true"
    for name, extra in jobs.items():
        print(f"{name} ...", flush=True)
        run_dir = str(tmp / name.replace(" ", "_").replace(",", ""))
        rows[name] = in_fresh_process(kdlab_run, [*common, *extra], run_dir)
    bf16 = rows["kdlab kd"]["precision"].startswith("bf16")
    print("hand-written loop, same tricks ...", flush=True)
    rows["hand-written loop, same tricks"] = in_fresh_process(
        hand_loop, str(tmp / "data"), str(teacher_ckpt), args.epochs, bf16)
    print("teacher-only passes ...", flush=True)
    one_pass = in_fresh_process(teacher_pass, str(tmp / "data"), str(teacher_ckpt), bf16)

    for row in rows.values():
        row["images_per_s"] = best_epoch_speed(row)

    # ALM-KD: epochs 1..n-3 are plain, the last two run a meta pass; a window of
    # meta_every = 10 epochs holds one meta pass and nine plain epochs.
    alm = rows["kdlab alm_kd"]["epoch_seconds"]
    plain, meta = min(alm[1:-2]), min(alm[-2:])
    alm_window_epoch = (9 * plain + meta) / 10
    kd_epoch = min(rows["kdlab kd"]["epoch_seconds"][1:])

    flops = model_flops_per_image()
    kd_flops = 3 * flops["resnet8x4"] + flops["resnet32x4"]  # student fwd+bwd, teacher fwd
    ce_flops = 3 * flops["resnet8x4"]
    peaks = {kind: max(first_peaks[kind], measured_peak_flops(kind)) for kind in first_peaks}
    for name, row in rows.items():
        # cached teacher logits: no teacher forward per step
        cached = " ce" in name or "no augmentation" in name or "view cache" in name
        per_image = ce_flops if cached else kd_flops
        peak = peaks["bf16" if row["precision"].startswith("bf16") else "fp32"]
        row["mfu"] = row["images_per_s"] * per_image / peak

    def speed(name: str) -> float:
        return rows[name]["images_per_s"]

    ref = speed("reference (classic loop)")
    ratios = {
        "kdlab/reference (kd, default settings)": speed("kdlab kd") / ref,
        "kdlab/reference (kd, both fp32)": speed("kdlab kd, fp32") / ref,
        "kd/ce time per image (augmented)": speed("kdlab ce") / speed("kdlab kd"),
        "alm_kd/kd time per epoch (window of 10 with one meta pass)": alm_window_epoch / kd_epoch,
        "alm_kd meta epoch / plain epoch": meta / plain,
        "kd/ce time per image (no augmentation, cached teacher)":
            speed("kdlab ce, no augmentation") / speed("kdlab kd, no augmentation"),
        "kd with the view cache / ce, time per image (augmented)":
            speed("kdlab ce") / speed("kdlab kd, view cache"),
        "kdlab / hand-written loop with the same tricks (kd)":
            speed("kdlab kd") / speed("hand-written loop, same tricks"),
        "view-cache build / 162 teacher-only passes":
            rows["kdlab kd, view cache"]["teacher_cache_s"] / (162 * one_pass["seconds"]),
    }
    kd_epoch_s = kd_epoch
    views_epoch_s = min(rows["kdlab kd, view cache"]["epoch_seconds"][1:])
    build_s = rows["kdlab kd, view cache"]["teacher_cache_s"]
    break_even = build_s / max(kd_epoch_s - views_epoch_s, 1e-9)
    lines = ["| run | precision | images/s | peak RSS MB | MFU | one-time teacher cache s |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cache_s = row.get("teacher_cache_s")
        lines.append(f"| {name} | {row['precision']} | {row['images_per_s']:.1f} | "
                     f"{row['peak_rss_mb']:.0f} | {100 * row['mfu']:.1f}% | "
                     f"{'-' if not cache_s else f'{cache_s:.1f}'} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += ["", f"View cache: built once in {build_s:.0f} s (162 views x "
              f"{rows['kdlab kd, view cache']['epoch_images'][0]} images; one teacher-only "
              f"pass {one_pass['seconds']:.1f} s); a KD epoch takes {kd_epoch_s:.1f} s without "
              f"it and {views_epoch_s:.1f} s with it, so it pays off after {break_even:.0f} "
              "epochs, summed over every run that reads it."]
    peak_note = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    lines += ["", "images/s: the fastest timed epoch of each run (epoch 1 is warm-up; on a "
              "shared machine single epochs vary by up to 25%). MFU: achieved model FLOP/s "
              "over the best 2048x2048 matmul measured before and after the runs "
              f"({peak_note}), bf16 rows against the bf16 matmul. FLOPs per image: "
              f"resnet8x4 {flops['resnet8x4'] / 1e6:.0f} MFLOP, resnet32x4 "
              f"{flops['resnet32x4'] / 1e6:.0f} MFLOP (forward); training counts 3x the "
              "student forward + the teacher forward (alm_kd: its meta pass is not counted).",
              f"Data: {args.train} generated images (every loop trains on 80%: kdlab's 10% "
              f"meta and 10% val splits held out), batch {BATCH}, {args.epochs} epochs; torch "
              f"{torch.__version__}, {os.cpu_count()} CPU threads, native bf16: "
              f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}."]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ratios": ratios, "flops_per_image": flops,
                               "measured_peak_flops": peaks, "teacher_pass_s": one_pass,
                               "view_cache_break_even_epochs": break_even,
                               "args": vars(args)}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")

if __name__ == "__main__":
    sys.exit(main())
