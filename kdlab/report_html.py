"""``kdlab report --html``: the report as one self-contained HTML page.

Everything is inside the file: the tables as HTML tables, the plots (accuracy vs ECE, the
reliability grid, the figures the runs' methods declare and the per-run figures they name,
with their captions and headings) as base64 PNG ``data:`` images, the style inline, no
script and nothing fetched from elsewhere, so the page opens from disk, from an e-mail or
from a cluster's file browser alike. It imports :mod:`kdlab.report`, never the reverse.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .report import Report

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td { font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f6f6f6; padding: 0 0.2em; }
.note { color: #8a5a00; }
"""

CAPTIONS = {
    "report_acc_vs_ece": "Test accuracy against test ECE (best-on-val checkpoint), mean ± std "
                         "over seeds per group.",
    "report_reliability": "Reliability diagrams on the test set, bins pooled over the seeds "
                          "of each group: in each bin the accuracy bar and, beside it, the "
                          "hatched gap to the bin's mean confidence (red: over-confident, "
                          "green: under-confident).",
}


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{png_data_uri(path)}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(frame) -> str:
    return frame.to_html(index=False, escape=True, border=0, na_rep="-")


def _code_spans(text: str) -> str:
    """Markdown's `code` spans as <code> elements."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", text)


def render_html(report: Report) -> str:
    """The page: summary table, notes, the differences from a baseline (``--baseline``),
    failed runs, plots and the methods' per-run plots."""
    e = html.escape
    parts = ["<h1>kdlab report</h1>",
             "<p>Runs under: " + ", ".join(f"<code>{e(str(p))}</code>" for p in report.sources)
             + "</p>"]
    parts += [f"<p>{e(paragraph)}</p>" for paragraph in report.intro]
    if report.table is not None:
        parts += ["<h2>Summary</h2>", _table(report.table)]
    if report.notes:
        parts.append("<ul>" + "".join(f'<li class="note">{e(n)}</li>' for n in report.notes)
                     + "</ul>")
    if report.differences is not None:
        parts += [f"<h2>Difference from the baseline <code>method={e(report.baseline)}</code>"
                  "</h2>", _table(report.differences)]
        parts += [f"<p>{_code_spans(e(n))}</p>" for n in report.difference_notes]
    if report.failed is not None:
        failed = report.failed.assign(error=report.failed["error"].str.replace("\\|", "|",
                                                                               regex=False))
        parts += ["<h2>Failed or unfinished runs</h2>", _table(failed)]
    if report.plots:
        parts.append("<h2>Plots</h2>")
        captions = {**CAPTIONS, **report.captions}
        parts += [_figure(p, captions.get(p.stem, p.stem)) for p in report.plots]
    for heading, figures in report.run_plots.items():
        parts.append(f"<h2>{e(heading)}</h2>")
        parts += [_figure(path, label) for label, path in figures]
    title = "kdlab report: " + ", ".join(str(p) for p in report.sources)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{e(title)}</title>\n"
            # an empty inline icon: browsers would otherwise ask the server for favicon.ico
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(parts)
            + "\n</body>\n</html>\n")


__all__ = ["png_data_uri", "render_html"]
