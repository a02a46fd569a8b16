"""The report and run plots are readable: no title runs into another panel, no legend covers
data, every colour drawn is in the legend, and a bin's weight shows how many examples it
holds (issue 12's report-plot traps). Figures are inspected as saved, through savefig."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.runs import METHOD_TARGETS
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from kdlab import plots
from kdlab.cli import report_main
from kdlab.methods.alm_kd_plots import plot_mixing_history
from kdlab.methods.alm_kd_report import summarise
from kdlab.report import plot_acc_vs_ece


@pytest.fixture
def saved(monkeypatch):
    """(figure, renderer) of every figure savefig wrote, as drawn (text extents final)."""
    figures = []
    original = Figure.savefig

    def record(fig, *args, **kwargs):
        original(fig, *args, **kwargs)
        figures.append((fig, fig.canvas.get_renderer()))

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def extent(artist, renderer):
    return artist.get_window_extent(renderer)


def bins(count, correct, confidence):
    return {"n_bins": len(count), "count": count, "correct": correct, "confidence": confidence}


# one bin of 1 example, one of 267 over-confident, one under-confident
BINS = bins([0, 0, 1, 0, 0, 0, 0, 267, 0, 40], [0, 0, 1, 0, 0, 0, 0, 150, 0, 39],
            [0, 0, 0.25, 0, 0, 0, 0, 200.0, 0, 37.0])
LONG = "method=alm_kd, noise.rate=0.4, method.meta_lr=1500, teacher.label_noise=none, seed 0"


def test_reliability_panels_titles_and_legend_never_overlap(saved, tmp_path):
    plots.reliability_grid([(f"{LONG} #{i}", BINS) for i in range(6)], tmp_path / "r.png",
                           "reliability on the test set", cols=4)
    fig, renderer = saved[-1]
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 6
    # each panel with its (wrapped) title, labels and tick labels
    boxes = [ax.get_tightbbox(renderer) for ax in axes]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (i, j)
    (legend,) = fig.legends
    frame = extent(legend, renderer)
    figure = fig.bbox
    assert figure.x0 <= frame.x0 and frame.x1 <= figure.x1 and figure.y0 <= frame.y0
    assert not any(frame.overlaps(box) for box in boxes)


def test_reliability_colours_are_in_the_legend_and_bins_are_weighted_by_count(saved, tmp_path):
    plots.reliability_diagram(BINS, tmp_path / "one.png", "a run")
    fig, _ = saved[-1]
    ax = fig.axes[0]
    bars = list(ax.patches)
    legend_colours = {to_hex(h.get_facecolor()[:3]) for h in fig.legends[0].get_patches()}
    drawn = {to_hex(b.get_facecolor()[:3]) for b in bars}
    assert drawn <= legend_colours  # accuracy, over- and under-confident gaps all explained
    assert {plots.OVER.lower(), plots.UNDER.lower()} <= drawn  # both gaps occur in BINS
    accuracy = [b for b in bars if to_hex(b.get_facecolor()[:3]) == plots.ACCURACY.lower()]
    alpha = {round(b.get_x() * 10): b.get_alpha() for b in accuracy}  # 10 bins: bin index
    # bins 2 (1 example), 7 (267), 9 (40): opacity follows the count, and each count is shown
    assert alpha[2] < alpha[9] < alpha[7] == 1.0
    assert {t.get_text() for t in ax.texts} >= {"1", "267", "40"}


def test_accuracy_vs_ece_legend_sits_beside_the_points(saved, tmp_path):
    summary = pd.DataFrame({
        "method": [f"{LONG} variant {i}" for i in range(8)],
        "test.acc_mean": [0.9 + 0.01 * i for i in range(8)], "test.acc_std": [0.01] * 8,
        "test.ece_mean": [0.05 + 0.01 * i for i in range(8)], "test.ece_std": [0.005] * 8})
    path = plot_acc_vs_ece(summary, ["method"], tmp_path / "acc.png")
    assert path is not None and path.stat().st_size > 10_000
    fig, renderer = saved[-1]
    (ax,) = fig.axes
    legend = extent(ax.get_legend(), renderer)
    assert legend.x0 >= ax.bbox.x1  # entirely right of the plotting area: covers no point
    assert len(ax.get_legend().get_texts()) == 8


def rectangle(bar) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of a drawn bar, whatever the sign of its height."""
    x, y, w, h = bar.get_x(), bar.get_y(), bar.get_width(), bar.get_height()
    return x, x + w, min(y, y + h), max(y, y + h)


def intersection_area(a, b) -> float:
    return (max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
            * max(0.0, min(a[3], b[3]) - max(a[2], b[2])))


def test_reliability_accuracy_and_gap_bars_never_hide_each_other(saved, tmp_path):
    """Bin 7 is over-confident (150 of 267 right at mean confidence 200/267), bins 2 and 9
    under-confident (1/1 at 0.25; 39/40 at 37/40): each accuracy bar shows its whole height,
    each gap bar spans exactly [min(acc, conf), max(acc, conf)] beside it, and a black tick
    marks the confidence."""
    plots.reliability_diagram(BINS, tmp_path / "one.png", "a run")
    fig, _ = saved[-1]
    ax = fig.axes[0]
    expected = {2: (1 / 1, 0.25 / 1, plots.UNDER), 7: (150 / 267, 200 / 267, plots.OVER),
                9: (39 / 40, 37 / 40, plots.UNDER)}
    bars = list(ax.patches)
    accuracy = {round(b.get_x() * 10): b for b in bars
                if to_hex(b.get_facecolor()[:3]) == plots.ACCURACY.lower()}
    gaps = {int(b.get_x() * 10): b for b in bars if b not in accuracy.values()}
    assert set(accuracy) == set(gaps) == set(expected)
    ticks = [seg for c in ax.collections for seg in c.get_segments()]
    for i, (acc, conf, colour) in expected.items():
        x0, x1, y0, y1 = rectangle(accuracy[i])
        assert (y0, y1) == pytest.approx((0.0, acc)), i
        # nothing drawn covers any part of the accuracy bar
        assert all(intersection_area(rectangle(accuracy[i]), rectangle(other)) == 0
                   for other in bars if other is not accuracy[i]), i
        gx0, gx1, gy0, gy1 = rectangle(gaps[i])
        assert (gy0, gy1) == pytest.approx((min(acc, conf), max(acc, conf))), i
        assert 0.1 * i <= x0 < x1 <= gx0 < gx1 <= 0.1 * (i + 1) + 1e-9, i  # within the bin
        assert to_hex(gaps[i].get_facecolor()[:3]) == colour.lower() and gaps[i].get_hatch()
        tick = [seg for seg in ticks if gx0 - 1e-9 <= seg[0][0] < seg[1][0] <= gx1 + 1e-9]
        assert len(tick) == 1 and tick[0][0][1] == tick[0][1][1] == pytest.approx(conf), i


def long_named_runs(root, methods):
    """One finished ALM-KD-like run per method, grouped by six keys: labels of ~90 chars."""
    for i, method in enumerate(methods):
        d = root / method
        d.mkdir(parents=True)
        config = {"seed": 0, "choices": {"method": method},
                  "noise": {"type": "symmetric", "rate": 0.4},
                  "method": {"meta_lr": 1500, "_target_": METHOD_TARGETS.get(method, "")},
                  "teacher": {"label_noise": "none"},
                  "optimizer": {"lr": 0.05}, "dataset": {"val_fraction": 0.1}}
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        results = {"status": "finished", "method": method, "seed": 0,
                   "test": {"acc": 0.7 + 0.02 * i, "ece": 0.05 + 0.01 * i},
                   "test_last": {"acc": 0.7, "ece": 0.1},
                   "teachers": [{"name": "cnn", "test": {"acc": 0.9}}],
                   "reliability": {"n_bins": 3, "count": [1, 2, 3],
                                   "confidence": [0.2, 1.1, 2.7], "correct": [0, 1, 3]},
                   "mixing": {"label_weight_clean": 0.8, "label_weight_noisy": 0.3 + 0.01 * i}}
        (d / "results.json").write_text(json.dumps(results))
    return "method,noise.rate,method.meta_lr,teacher.label_noise,optimizer.lr,dataset.val_fraction"


def test_report_plots_with_long_group_names_stay_small_and_show_every_word(saved, tmp_path):
    methods = ["alm_kd", "guided_self_distill", "multi_teacher_kd", "sinkhorn_kd",
               "tgeo_kd", "kd_ls"]
    keys = long_named_runs(tmp_path / "runs", methods)
    report_main([str(tmp_path / "runs"), "--by", keys])
    names = ["report_acc_vs_ece.png", "report_reliability.png", "report_mixing.png"]
    assert len(saved) == len(names)
    for name, (fig, renderer) in zip(names, saved, strict=True):
        width, height = Image.open(tmp_path / "runs" / name).size
        assert width <= 1400 and height <= 1400, (name, width, height)
        # every title, label, tick label and legend lies inside the saved figure
        page = fig.bbox.padded(1)
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.axison]
        boxes += [extent(legend, renderer) for legend in fig.legends]
        boxes += [extent(fig._suptitle, renderer)] if fig._suptitle else []
        for box in boxes:
            assert page.x0 <= box.x0 and box.x1 <= page.x1, name
            assert page.y0 <= box.y0 and box.y1 <= page.y1, name
        # every group's whole label is shown (wrapped, never cut short)
        shown = " ".join(t.get_text() for t in fig.findobj(Text)).replace("\n", " ")
        for method in methods:
            assert f"method={method}, noise.rate=0.4, method.meta_lr=1500, " \
                   "teacher.label_noise=none, optimizer.lr=0.05, dataset.val_fraction=0.1" \
                   in shown, (name, method)
        # legends beside the data, never on it
        for ax in fig.axes:
            if ax.get_legend():
                assert not extent(ax.get_legend(), renderer).overlaps(ax.bbox), name


LOW, HIGH = 1e-7, 2.0


def bimodal_label_weights() -> torch.Tensor:
    """100 examples, the first 40 noisy: 28 noisy and 12 clean at the lower bound, 10 noisy
    and 40 clean at the upper one, the rest in between."""
    noisy = [LOW] * 28 + [0.5] * 2 + [HIGH] * 10
    clean = [LOW] * 12 + [0.3 + 0.1 * i for i in range(8)] + [HIGH] * 40
    return torch.tensor(noisy + clean, dtype=torch.float32)


def test_alm_kd_weight_plot_shows_weights_piled_at_the_bounds(saved, tmp_path):
    noise = torch.arange(100) < 40
    label = {-1: torch.full((100,), 0.1), 0: torch.linspace(0.05, 1.0, 100),
             1: bimodal_label_weights()}
    tables = {e: torch.stack([w, 1.0 - w / 2], 1).float() for e, w in label.items()}
    history = [summarise(e, t, noise) for e, t in tables.items()]
    plot_mixing_history(history, tables[1], noise, ["label", "teacher"], tmp_path / "w.png",
                        bounds=(LOW, HIGH))
    fig, renderer = saved[-1]
    ax, ax_hist = fig.axes[0], fig.axes[1]  # the label weight's row
    boxes = {name: [p for p in ax.patches if p.get_gid() == f"{name} q25-q75"]
             for name in ("clean", "noisy")}
    medians = {name: [c for c in ax.collections if c.get_gid() == f"{name} median"]
               for name in ("clean", "noisy")}
    for p, w in enumerate(label.values()):
        w = w.float().double().numpy()
        for name, part in (("clean", w[40:]), ("noisy", w[:40])):
            box = boxes[name][p]
            assert (box.get_y(), box.get_y() + box.get_height()) == pytest.approx(
                tuple(np.quantile(part, [0.25, 0.75]))), (p, name)
            (segment,) = [s for s in medians[name][0].get_segments()
                          if s[0][0] < box.get_x() + box.get_width() / 2 < s[1][0]]
            assert segment[0][1] == pytest.approx(np.median(part)), (p, name)
        # clean and noisy side by side at each pass, neither drawn over the other
        clean, noisy = boxes["clean"][p], boxes["noisy"][p]
        assert clean.get_x() + clean.get_width() <= noisy.get_x()
        assert p - 0.5 < clean.get_x() and noisy.get_x() + noisy.get_width() < p + 0.5
    # at the last pass: noisy q25 (and median) sit on the lower bound, clean q75 on the upper
    piled = {line.get_gid(): np.asarray(line.get_xdata()) for line in ax.lines
             if "quarter at" in str(line.get_gid())}
    last = 2
    assert np.isclose(piled[f"noisy quarter at {LOW:g}"], last + 0.2).any()
    assert np.isclose(piled[f"clean quarter at {HIGH:g}"], last - 0.2).any()
    assert not np.isclose(piled[f"clean quarter at {LOW:g}"], last - 0.2).any()
    assert not np.isclose(piled[f"noisy quarter at {HIGH:g}"], last + 0.2).any()
    # the current weights: fractions at each bound by hand count, histogram in fractions
    assert ax_hist.get_title().splitlines() == [f"at {LOW:g}: clean 20%, noisy 70%",
                                                f"at {HIGH:g}: clean 67%, noisy 25%"]
    tallest = {p.get_gid(): p.get_path().vertices[:, 1].max() for p in ax_hist.patches}
    assert tallest == pytest.approx({"clean": 40 / 60, "noisy": 28 / 40})
    # the legend names the median and sits outside every panel and the title
    (legend,) = fig.legends
    assert "median" in [t.get_text() for t in legend.get_texts()]
    frame = extent(legend, renderer)
    assert fig.bbox.x0 <= frame.x0 and frame.x1 <= fig.bbox.x1 and fig.bbox.y0 <= frame.y0
    assert not any(frame.overlaps(a.get_tightbbox(renderer)) for a in fig.axes)
    assert not frame.overlaps(extent(fig._suptitle, renderer))
