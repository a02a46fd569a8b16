"""`kdlab report --html`: one self-contained page (tables, reliability grid, accuracy vs ECE,
ALM-KD weight plots, images inlined), checked as a file and, when Chromium and chromedriver
are installed (Debian: `apt-get install chromium chromium-driver`), in a headless browser:
the page renders, every image decodes, nothing is fetched and the console stays clean."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers.browser import PAGE_STATE, HeadlessChromium, find_chromium
from helpers.runs import METHOD_TARGETS

from kdlab.cli import report_main
from kdlab.plots import reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(d: Path, method: str, seed: int, acc: float, mixing=None) -> None:
    """A finished run directory as kdlab train leaves it (config.yaml + results.json)."""
    d.mkdir(parents=True)
    config = {"seed": seed, "choices": {"method": method},
              "method": {"_target_": METHOD_TARGETS[method]}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"status": "finished", "method": method, "seed": seed,
               "test": {"acc": acc, "ece": 0.05 + acc / 10}, "test_last": {"acc": acc - 0.01,
                                                                          "ece": 0.1},
               "teachers": [{"name": "cnn", "test": {"acc": 0.9}}],
               "reliability": {"n_bins": 3, "count": [1, 2, 3], "confidence": [0.2, 1.1, 2.7],
                               "correct": [0, 1, 3]}}
    if mixing:
        results["mixing"] = {"label_weight_clean": mixing[0], "label_weight_noisy": mixing[1]}
    (d / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = tmp_path_factory.mktemp("html") / "runs"
    fake_run(runs / "alm0", "alm_kd", 0, 0.81, (0.9, 0.2))
    fake_run(runs / "alm1", "alm_kd", 1, 0.85, (0.8, 0.4))
    fake_run(runs / "kd0", "kd", 0, 0.70)
    fake_run(runs / "kd1", "kd", 1, 0.74)
    (runs / "broken").mkdir()
    (runs / "broken" / "config.yaml").write_text("seed: 3\n")
    (runs / "broken" / "failed.json").write_text(json.dumps(
        {"status": "failed", "error": "ConfigError: a <b> & c | d"}))
    # an ALM-KD run's own weight plot (any PNG: the report only shows it)
    reliability_diagram({"count": [1, 2], "confidence": [0.5, 1.8], "correct": [0, 2]},
                        runs / "alm0" / "alm_mixing_weights.png", "stand-in")
    report_main([str(runs), "--html"])
    return runs / "report.html"


def data_images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_the_page_holds_everything_it_shows(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    # tables: the summary (mean ± std over seeds) and the failed run, escaped
    assert "<table" in text and text.count("<table") == 2
    assert "0.8300 ± 0.0283" in text and "0.7200 ± 0.0283" in text
    assert "ConfigError: a &lt;b&gt; &amp; c | d" in text
    # four images inlined: acc vs ECE, reliability grid, mixing summary, one run's weights
    images = data_images(text)
    assert len(images) == 4 and all(i.startswith(PNG_SIGNATURE) for i in images)
    assert [a for a in re.findall(r'alt="([^"]+)"', text)] == [
        "report_acc_vs_ece", "report_reliability", "report_mixing", "alm_mixing_weights"]
    assert (page.parent / "report_mixing.png").read_bytes() in images
    assert (page.parent / "alm0" / "alm_mixing_weights.png").read_bytes() in images
    # nothing outside the file: no URL, no script, every src/href a data: URI
    assert not re.search(r"https?://|<script|<link[^>]+href=\"(?!data:)", text)
    assert all(v.startswith("data:") for v in re.findall(r'(?:src|href)="([^"]*)"', text))


@pytest.mark.real_parts
def test_the_page_renders_in_headless_chromium(page, tmp_path):
    found = find_chromium()
    if found is None:
        pytest.skip("no Chromium + chromedriver on PATH (Debian: apt-get install chromium "
                    "chromium-driver)")
    with HeadlessChromium(*found) as browser:
        # the check itself, on a page that is broken on purpose: it must see the faults
        bad = tmp_path / "bad.html"
        bad.write_text('<html><body><img src="data:image/png;base64,AAAA" alt="x">'
                       "<script>console.error('broken on purpose')</script></body></html>")
        browser.open(bad.as_uri())
        state = browser.run(PAGE_STATE)
        assert state["images"][0]["width"] == 0
        assert any("broken on purpose" in e["message"] for e in browser.console()
                   if e["level"] == "SEVERE")

        browser.open(page.as_uri())
        state = browser.run(PAGE_STATE)
        console = browser.console()
        shot = browser.screenshot(tmp_path / "report.png")
    assert state["ready"] == "complete" and state["title"].startswith("kdlab report")
    assert len(state["images"]) == 4
    for image in state["images"]:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
    assert state["tables"] == 2 and "0.8300 ± 0.0283" in state["text"]
    assert state["external"] == [] and state["performance"] == []
    assert [e for e in console if e["level"] in ("SEVERE", "WARNING")] == []
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
