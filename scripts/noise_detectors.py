"""How good is ALM-KD's noise AUROC? Its label weights against simple detectors of the same
noisy labels, on the same runs.

    .venv/bin/python scripts/noise_detectors.py \
        scripts/results/alm_noise_fashion_mnist_sym_clean.json

For every ALM-KD run in the records of ``scripts/alm_noise_experiment.py`` (its setting,
teachers, seed), the noisy training labels are scored by:

- ALM-KD label weight: the run's final label-loss weights (``method.mixing_weights[:, 0]``
  of its last checkpoint; low = noisy), the number the experiment reports as noise AUROC;
- teacher p(label): the run's teacher's softmax probability of the given label on the
  un-augmented train image (low = noisy), and teacher disagrees: 1 where the teacher's top
  class is not the given label (a hard score: ties count 1/2);
- student p(label), ALM-KD and CE: the same probability from the selected student of the
  ALM-KD run and of the CE run of the same seed (the small-loss criterion after training).

It reads the runs themselves (each record's ``run_dir``, and the teacher cache next to the
runs: the experiment's ``--work``), so it runs where the experiment ran. AUROC with noisy =
positive (``kdlab.methods.alm_kd_report.noise_auroc``: 1 = every noisy
label scored below every clean one, 0.5 = no separation). Writes
``scripts/results/noise_detectors_TAG.md`` / ``.json`` (``--tag``; default: the records
files' suffixes after ``alm_noise_``); mean +/- std over seeds per setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def label_probabilities(model: torch.nn.Module, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(given label), top class) of every train row, by row index, un-augmented."""
    from kdlab.teachers import channels_last

    n = int(dm.train_size)
    p_label, top = torch.empty(n), torch.empty(n, dtype=torch.long)
    model = model.to(memory_format=torch.channels_last).eval()
    with torch.inference_mode():
        for raw in dm.eval_dataloader("train"):
            batch = dm.model_batch(raw, "cpu", train=False)
            probs = model(channels_last(batch["input"])).float().softmax(-1)
            idx = batch["index"]
            p_label[idx] = probs.gather(1, batch["target"][:, None])[:, 0]
            top[idx] = probs.argmax(-1)
    return p_label, top


def checkpoint_model(path: Path) -> torch.nn.Module:
    from kdlab.evaluate import build_student, read_checkpoint

    return build_student(read_checkpoint(path))


def teacher_checkpoint(run_dir: Path) -> Path:
    """The auto-trained teacher of a run: the teacher cache's run whose test accuracy the run
    reports for its teacher (the cache directory is named by the teacher's config)."""
    results = json.loads((run_dir / "results.json").read_text())
    want = results["teachers"][0]["test"]["acc"]
    cache = run_dir.parents[1] / "cache" / "teachers"
    for candidate in sorted(cache.glob("*/run-*/results.json")):
        r = json.loads(candidate.read_text())
        if r["seed"] == results["seed"] and r["test"]["acc"] == want \
                and r.get("dataset") == results.get("dataset"):
            return candidate.parent / "checkpoints" / "best.ckpt"
    raise SystemExit(f"noise_detectors: no cached teacher of {run_dir} under {cache}")


def detectors(alm: dict, ce: dict | None) -> dict[str, float]:
    from kdlab.data import instantiate_datamodule
    from kdlab.methods.alm_kd_report import noise_auroc

    run_dir = Path(alm["run_dir"])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    dm = instantiate_datamodule(cfg)
    dm.setup()
    mask = dm.noise_mask
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["state_dict"]
    out = {"ALM-KD label weight": noise_auroc(last["method.mixing_weights"][:, 0], mask)}
    p, top = label_probabilities(checkpoint_model(teacher_checkpoint(run_dir)), dm)
    out["teacher p(label)"] = noise_auroc(p, mask)
    out["teacher disagrees"] = noise_auroc((top == dm.splits["train"].targets).float(), mask)
    p, _ = label_probabilities(checkpoint_model(run_dir / "checkpoints" / "best.ckpt"), dm)
    out["student p(label), ALM-KD"] = noise_auroc(p, mask)
    if ce is not None:
        p, _ = label_probabilities(
            checkpoint_model(Path(ce["run_dir"]) / "checkpoints" / "best.ckpt"), dm)
        out["student p(label), CE"] = noise_auroc(p, mask)
    reported = (alm.get("mixing") or {}).get("noise_auroc")
    if reported is not None and abs(reported - out["ALM-KD label weight"]) > 1e-6:
        raise SystemExit(f"noise_detectors: {run_dir}: the last checkpoint's weights give "
                         f"AUROC {out['ALM-KD label weight']:.4f}, the run reported "
                         f"{reported:.4f}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", type=Path, nargs="+", help="alm_noise_*.json files")
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "results")
    p.add_argument("--tag", default=None,
                   help="output name suffix (default: the records files' suffixes)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for path in args.records:
        records = json.loads(path.read_text())
        for alm in (r for r in records if r["row"] == "alm_kd"):
            ce = next((r for r in records if r["row"] == "ce" and r["seed"] == alm["seed"]
                       and r["setting"] == alm["setting"]), None)
            print(f"{alm['setting']} {alm['teachers']} seed {alm['seed']} ...", flush=True)
            rows.append({"setting": alm["setting"], "teachers": alm["teachers"],
                         "seed": alm["seed"], "auroc": detectors(alm, ce)})
    tag = args.tag or "_".join(p.stem.removeprefix("alm_noise_") for p in args.records)
    names = list(dict.fromkeys(k for r in rows for k in r["auroc"]))
    lines = ["| setting | teachers | seeds | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for key in dict.fromkeys((r["setting"], r["teachers"]) for r in rows):
        group = [r for r in rows if (r["setting"], r["teachers"]) == key]
        cells = []
        for name in names:
            values = [r["auroc"][name] for r in group if name in r["auroc"]]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.fmean(values):.3f} ± {sd:.3f}")
        lines.append(f"| {key[0]} | {key[1]} | {len(group)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["scripts/noise_detectors.py", *(argv or sys.argv[1:])])
    (args.out / f"noise_detectors_{tag}.md").write_text(
        "# Noise AUROC: ALM-KD's label weights against simple detectors\n\n"
        f"Command: `.venv/bin/python {command}`  \nAUROC of each score for the noisy "
        "training labels (noisy = positive), mean ± std over seeds; see the script's "
        "docstring for the scores.\n\n" + text + "\n")
    (args.out / f"noise_detectors_{tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
