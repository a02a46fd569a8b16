"""Why do noisy examples end with a higher label weight than clean ones (issue 11)?

    .venv/bin/python scripts/alm_diagnose.py record --seeds 0 1 2     # runs + per-pass states
    .venv/bin/python scripts/alm_diagnose.py summary --seeds 0 1 2    # the table of the notes
    .venv/bin/python scripts/alm_diagnose.py analyse --seeds 0        # per pass, in detail
    .venv/bin/python scripts/alm_diagnose.py centred --seeds 0        # where centring errs

``record`` runs ALM-KD (digits, symmetric 0.4, clean-label CE teacher, separate val split;
``--alm`` overrides, e.g. ``method.paper=true method.meta_lr=500`` for the first-order step
of main a808dee, whose chunk normalisation made 1500 act like 500) with the meta pass
wrapped so that, at every pass, the student's weights, the lr and the table before and
after are saved (training is unchanged). The notes' table was recorded with main's code.

``summary`` / ``analyse`` recompute, for each pass, the closed-form meta-gradient of the
label weight of every train example at the table it had at that pass,

    dL/dlambda_i0 = -s (1/M) sum_v (h_i . h_v + 1) <r_v, g_i0>,   r_v = softmax(o_v) - e_{y_v}

(first order: r_v at the un-stepped layer) and split the sum over v into meta examples of
the example's true class, of its (noisy) label's class, and the others, and the kernel into
its common part (the mean of h_i . h_v over all pairs, plus 1) and the rest; and compare
with the centred kernel (``kernel: centered``), also with the test split as the meta set.
Medians and AUROC (noisy examples flagged by a gradient that lowers their weight).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

WORK = Path("/tmp/kdlab_alm")
DIAG = WORK / "diagnose"


def method_overrides(dataset: str, method: str, rate: float, seed: int, extra=()) -> list[str]:
    """The issue's setting: symmetric noise, a teacher trained on the clean labels of the
    same train split, a separate clean val split, meta passes after epochs 5, 10, .., 25."""
    return [f"dataset={dataset}", f"method={method}", "noise=symmetric", f"noise.rate={rate}",
            f"seed={seed}", "teacher.label_noise=none", "dataset.val_fraction=0.1",
            "trainer=cpu", "trainer.enable_progress_bar=false", "num_threads=1",
            "method.meta_start=5", "method.meta_every=5", *extra]


def run_cfg(overrides: list[str], run_dir: Path) -> dict:
    import contextlib
    import json
    import os
    import shutil

    from kdlab.config import compose
    from kdlab.pipeline import run

    os.environ.setdefault("KDLAB_CACHE_DIR", str(WORK / "cache"))
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / "runs.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        return run(compose(overrides), run_dir)


def run_data(seed: int):
    """(config, set-up datamodule, the clean-label teacher, the student's config node)."""
    import os

    from kdlab.config import compose
    from kdlab.data import instantiate_datamodule
    from kdlab.pipeline import trained_teachers
    from kdlab.teachers import load_teachers

    os.environ.setdefault("KDLAB_CACHE_DIR", str(WORK / "cache"))
    cfg = compose(method_overrides("digits", "alm_kd", 0.4, seed))
    dm = instantiate_datamodule(cfg)
    dm.setup()
    ((_, teacher),) = load_teachers(trained_teachers(cfg), dm.num_classes, dm.input_shape)
    return cfg, dm, teacher.eval()


def record(seeds, extra, tag):
    from kdlab.methods import alm_kd

    original = alm_kd.ALMKD.meta_pass
    state = {}

    def meta_pass(self, run):
        before = self.mixing_weights.clone()
        student = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
        original(self, run)
        # "epoch": the epoch the pass ran before, counted from 1 (run.epoch counts from 0)
        state["passes"].append({"epoch": run.epoch + 1, "lr": run.lr, "student": student,
                                "before": before, "after": self.mixing_weights.clone()})

    alm_kd.ALMKD.meta_pass = meta_pass
    try:
        for seed in seeds:
            state["passes"] = []
            out = DIAG / f"alm{tag}-s{seed}"
            if (out / "passes.pt").exists():
                continue
            res = run_cfg(method_overrides("digits", "alm_kd", 0.4, seed, extra),
                          out / "run")
            torch.save({"passes": state["passes"], "results": res}, out / "passes.pt")
            print(seed, res["test"]["acc"], res["mixing"])
    finally:
        alm_kd.ALMKD.meta_pass = original


def auroc(score_pos, score_neg):
    """P(score of a positive > score of a negative) + 1/2 P(tie): ALM-KD's noise AUROC with
    the score as a negated weight."""
    from kdlab.methods.alm_kd_report import noise_auroc

    mask = torch.cat([torch.ones(len(score_pos)), torch.zeros(len(score_neg))]).bool()
    return noise_auroc(-torch.cat([score_pos, score_neg]), mask)


def recorded(seed, tag):
    """A diagnosed run's record (its meta passes), config, data and teacher train logits."""
    rec = torch.load(DIAG / f"alm{tag}-s{seed}" / "passes.pt", weights_only=True)
    cfg, dm, teacher = run_data(seed)
    with torch.no_grad():
        t_logits = teacher(dm.splits["train"].inputs)
    return rec, cfg, dm, t_logits


def pass_features(cfg, dm, recorded_pass):
    """The student of one recorded pass, its train / meta last-layer inputs and head (f64)."""
    from kdlab.methods.lookahead import penultimate_and_logits
    from kdlab.models import build_model

    student = build_model(cfg.student, 10, dm.input_shape)
    student.load_state_dict(recorded_pass["student"])
    student.eval()
    head = student.classifier
    with torch.no_grad():
        h = penultimate_and_logits(student, dm.splits["train"].inputs)[0].double()
        hm = penultimate_and_logits(student, dm.splits["meta"].inputs)[0].double()
    return student, h, hm, head.weight.double().detach(), head.bias.double().detach()


def analyse(seeds, tag):
    from kdlab.methods.lookahead import term_logit_grads

    for seed in seeds:
        rec, cfg, dm, t_logits = recorded(seed, tag)
        train, meta = dm.splits["train"], dm.splits["meta"]
        noisy = dm.noise_mask
        y_clean, y_noisy = train.clean_targets, train.targets
        print(f"\n=== seed {seed}: teacher train acc (clean labels) "
              f"{(t_logits.argmax(1) == y_clean).float().mean():.3f}; "
              f"final label weight clean {rec['results']['mixing']['label_weight_clean']:.3f} "
              f"noisy {rec['results']['mixing']['label_weight_noisy']:.3f}")
        for p in rec["passes"]:
            student, h, hm, w, b = pass_features(cfg, dm, p)
            logits = h @ w.T + b
            g = term_logit_grads(logits, y_noisy, t_logits.double()[None], 4.0)  # (2, n, C)
            r = torch.softmax(hm @ w.T + b, -1) - torch.nn.functional.one_hot(meta.targets,
                                                                             10).double()
            kern = h @ hm.T + 1  # (n, M)
            common = float((h @ hm.T).mean()) + 1
            dot = torch.einsum("vc,knc->knv", r, g)  # <r_v, g_ij>
            M = len(meta)
            s = p["lr"] / 192  # chunk of 3 batches of 64
            contrib = -s / M * kern[None] * dot  # (2, n, M) per-pair contribution
            same_true = meta.targets[None, :] == y_clean[:, None]
            same_label = meta.targets[None, :] == y_noisy[:, None]
            groups = {"val of true class": same_true & ~same_label,
                      "val of label class": same_label & ~same_true,
                      "val of true=label class": same_true & same_label,
                      "other val": ~same_true & ~same_label}
            lam_moves = (p["after"] - p["before"])[:, 0]
            total = contrib[0].sum(1)
            print(f"-- pass before epoch {p['epoch']} (lr {p['lr']:.4f}): train acc on noisy "
                  f"labels {(logits.argmax(1) == y_noisy).float().mean():.3f}, on clean "
                  f"{(logits.argmax(1) == y_clean).float().mean():.3f}; |g_ce| clean "
                  f"{g[0][~noisy].norm(dim=1).median():.3f} noisy "
                  f"{g[0][noisy].norm(dim=1).median():.3f}; common kernel {common:.2f}, "
                  f"|h|^2 {float((h * h).sum(1).mean()):.2f}")
            print(f"   label-weight change this pass: clean median "
                  f"{lam_moves[~noisy].median():+.4f} mean {lam_moves[~noisy].mean():+.4f}; "
                  f"noisy median {lam_moves[noisy].median():+.4f} mean "
                  f"{lam_moves[noisy].mean():+.4f}; AUROC(noisy by low weight after) "
                  f"{auroc(-p['after'][noisy, 0], -p['after'][~noisy, 0]):.3f}")
            print(f"   fraction of noisy examples moving UP: "
                  f"{(lam_moves[noisy] > 0).float().mean():.3f}, clean "
                  f"{(lam_moves[~noisy] > 0).float().mean():.3f}")
            rows = [("grad total", total)]
            for name, mask in groups.items():
                rows.append((name, (contrib[0] * mask).sum(1)))
            cpart = -s / M * common * dot[0].sum(1)
            rows.append(("common kernel part", cpart))
            rows.append(("rest of kernel", total - cpart))
            # centred kernel: features minus their mean over train + meta, no "+1"
            mu = torch.cat([h, hm]).mean(0)
            ckern = (h - mu) @ (hm - mu).T
            cent = -s / M * (ckern[None] * dot).sum(2)  # (2, n)
            rows.append(("centred kernel (label)", cent[0]))
            rows.append(("centred kernel (teacher)", cent[1]))
            rows.append(("teacher col total", contrib[1].sum(1)))
            # the class-marginal residual of the meta split vs a large clean set (test)
            test = dm.splits["test"]
            with torch.no_grad():
                pt = torch.softmax(student(test.inputs).double(), -1)
            rbar_meta = r.mean(0)
            rbar_test = (pt - torch.nn.functional.one_hot(test.targets, 10).double()).mean(0)
            print("   mean residual per class, meta (144):",
                  " ".join(f"{v:+.3f}" for v in rbar_meta.tolist()))
            print("   mean residual per class, test (360):",
                  " ".join(f"{v:+.3f}" for v in rbar_test.tolist()))
            noisy_label_is_argmax = logits.argmax(1) == y_noisy
            for name, v in rows:
                print(f"   {name:26s} median clean {v[~noisy].median():+.2e} noisy "
                      f"{v[noisy].median():+.2e} | mean clean {v[~noisy].mean():+.2e} noisy "
                      f"{v[noisy].mean():+.2e} | AUROC(noisy by +grad) "
                      f"{auroc(v[noisy], v[~noisy]):.3f}")
            fit = noisy & noisy_label_is_argmax
            print(f"   noisy examples the student FITS (argmax = noisy label): "
                  f"{int(fit.sum())}/{int(noisy.sum())}; their label-weight change median "
                  f"{lam_moves[fit].median():+.4f}; the others "
                  f"{lam_moves[noisy & ~noisy_label_is_argmax].median():+.4f}")


def summary(seeds, tag):
    """One table over seeds: per pass, the final-table AUROC and the decomposition of the
    label column's meta-gradient (the paper's kernel) at the table of that pass."""
    from kdlab.methods.lookahead import (
        last_layer_meta_grad,
        penultimate_and_logits,
        term_logit_grads,
    )
    from kdlab.models import build_model

    rows: dict[int, list[dict]] = {}
    for seed in seeds:
        rec = torch.load(DIAG / f"alm{tag}-s{seed}" / "passes.pt", weights_only=True)
        cfg, dm, teacher = run_data(seed)
        train, meta, test = dm.splits["train"], dm.splits["meta"], dm.splits["test"]
        noisy = dm.noise_mask
        with torch.no_grad():
            t_logits = teacher(train.inputs).double()[None]
        for p in rec["passes"]:
            student = build_model(cfg.student, 10, dm.input_shape)
            student.load_state_dict(p["student"])
            student.eval()
            head = student.classifier
            with torch.no_grad():
                h = penultimate_and_logits(student, train.inputs)[0].double()
                hm = penultimate_and_logits(student, meta.inputs)[0].double()
                ht = penultimate_and_logits(student, test.inputs)[0].double()
            w, b = head.weight.double().detach(), head.bias.double().detach()
            lam = p["before"].double()
            g = term_logit_grads(h @ w.T + b, train.targets, t_logits, 4.0)[0]
            r = torch.softmax(hm @ w.T + b, -1) - torch.nn.functional.one_hot(
                meta.targets, 10).double()
            kern = h @ hm.T + 1
            dot = g @ r.T  # <r_v, g_i0>
            total = -(kern * dot).mean(1)  # dL/dlambda_i0 / s, first order
            common = -(float(kern.mean()) * dot).mean(1)
            same_true = meta.targets[None] == train.clean_targets[:, None]
            same_label = meta.targets[None] == train.targets[:, None]
            tiny = 1e-6  # first order: the residuals at the un-stepped layer
            grads = {}
            for name, hv, yv in (("centred", hm, meta.targets), ("centred, test as meta", ht,
                                                                 test.targets)):
                grads[name] = last_layer_meta_grad(lam, h, train.targets, t_logits, w, b, hv,
                                                   yv, tiny, 4.0, kernel="centered")[1][:, 0]
            grads["raw, test as meta"] = last_layer_meta_grad(lam, h, train.targets, t_logits,
                                                             w, b, ht, test.targets, tiny,
                                                             4.0)[1][:, 0]
            moved = (p["after"] - p["before"])[:, 0]
            rows.setdefault(p["epoch"], []).append({
                "auroc after": auroc(-p["after"][noisy, 0], -p["after"][~noisy, 0]),
                "up: noisy": float((moved[noisy] > 0).double().mean()),
                "up: clean": float((moved[~noisy] > 0).double().mean()),
                "|common| / |total|": float(common.abs().median() / total.abs().median()),
                "g raw": auroc(total[noisy], total[~noisy]),
                "g common": auroc(common[noisy], common[~noisy]),
                "g rest": auroc((total - common)[noisy], (total - common)[~noisy]),
                "g true-class val": auroc(-(kern * dot * same_true).mean(1)[noisy],
                                          -(kern * dot * same_true).mean(1)[~noisy]),
                "g label-class val": auroc(-(kern * dot * same_label).mean(1)[noisy],
                                           -(kern * dot * same_label).mean(1)[~noisy]),
                **{f"g {k}": auroc(v[noisy], v[~noisy]) for k, v in grads.items()},
                "|g_i0| clean": float(g[~noisy].norm(dim=1).median()),
                "|g_i0| noisy": float(g[noisy].norm(dim=1).median()),
            })
    keys = list(next(iter(rows.values()))[0])
    print("| pass (before epoch) | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for epoch, items in sorted(rows.items()):
        cells = [f"{sum(i[k] for i in items) / len(items):.3f}" for k in keys]
        print(f"| {epoch} | " + " | ".join(cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["record", "analyse", "centred", "summary"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tag", default="")
    p.add_argument("--alm", nargs="*", default=[])
    args = p.parse_args(argv)
    if args.what == "record":
        record(args.seeds, args.alm, args.tag)
    elif args.what == "summary":
        summary(args.seeds, args.tag)
    elif args.what == "centred":
        centred_breakdown(args.seeds, args.tag)
    else:
        analyse(args.seeds, args.tag)


def centred_breakdown(seeds, tag):
    """Where the centred-kernel gradient of the label weight points the wrong way."""
    from kdlab.methods.lookahead import last_layer_meta_grad

    for seed in seeds:
        rec, cfg, dm, t_logits = recorded(seed, tag)
        t_logits = t_logits.double()
        train, meta = dm.splits["train"], dm.splits["meta"]
        noisy = dm.noise_mask
        for p in rec["passes"]:
            _, h, hm, w, b = pass_features(cfg, dm, p)
            pred = (h @ w.T + b).argmax(1)
            lam = torch.tensor([[0.1, 0.9]], dtype=torch.float64).expand(len(h), 2)
            out = {}
            for kernel in ("raw", "centered"):
                _, g = last_layer_meta_grad(lam, h, train.targets, t_logits[None], w, b, hm,
                                            meta.targets, 1e-6, 4.0, kernel=kernel,
                                            kernel_scale=30.0)
                out[kernel] = g[:, 0]
            right = pred == train.clean_targets
            fits_noisy = pred == train.targets
            a_raw = auroc(out["raw"][noisy], out["raw"][~noisy])
            a_cen = auroc(out["centered"][noisy], out["centered"][~noisy])
            print(f"seed {seed} pass before epoch {p['epoch']}: AUROC raw {a_raw:.3f} "
                  f"centred {a_cen:.3f}")
            g = out["centered"]
            for name, mask in (("noisy, student right", noisy & right),
                               ("noisy, fits noisy label", noisy & fits_noisy),
                               ("noisy, other", noisy & ~right & ~fits_noisy),
                               ("clean, student right", ~noisy & right),
                               ("clean, student wrong", ~noisy & ~right)):
                if mask.sum() == 0:
                    continue
                v = g[mask]
                print(f"   {name:24s} n={int(mask.sum()):4d} frac grad>0 (weight down) "
                      f"{(v > 0).double().mean():.2f} median {v.median():+.2e}")


if __name__ == "__main__":
    main()
