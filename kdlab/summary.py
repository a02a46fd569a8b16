"""The table a finished run prints (and writes into train.log): teachers and student on the
test set, which epoch was selected and why. Plain text from ``results.json``'s dictionary,
without pandas, so training never needs it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLUMNS = (("acc", "acc"), ("ECE", "ece"), ("NLL", "nll"))  # header, results key


def text_table(header: str, names: list[str], numbers: list[list[float]],
               number_headers: list[str]) -> str:
    """Names left-aligned, numbers with 4 decimals right-aligned under left-aligned headers
    that start one space in (room for a sign), columns one space apart; NaN as ``NaN``."""
    columns = [[header, *names]]
    for j, title in enumerate(number_headers):
        cells = ["NaN" if math.isnan(row[j]) else f"{row[j]:.4f}" for row in numbers]
        width = max(map(len, cells))
        columns.append([f" {title}", *(cell.rjust(width) for cell in cells)])
    widths = [max(map(len, column)) for column in columns]
    return "\n".join(" ".join(column[i].ljust(width) for column, width in
                              zip(columns, widths, strict=True))
                     for i in range(len(columns[0])))


def run_summary(results: dict[str, Any], output_dir: Path) -> str:
    """The table a finished run prints: teachers and student on the test set."""
    student = results["student"]
    rows = [(f"teacher {t['name']} ({t['arch']})", t["test"]) for t in results["teachers"]]
    rows += [(f"student {student['name']} ({student['arch']}), best on val "
              f"(epoch {results['best_epoch']})", results["test"]),
             (f"student {student['name']}, last epoch", results["test_last"])]
    noise = results["noise"]
    head = (f"\nkdlab: method={results['method']} dataset={results['dataset']} "
            f"seed={results['seed']} noise={noise['type']}:{noise['rate']} "
            f"({results['wall_time_s']:.0f} s)")
    body = text_table("test set", [name for name, _ in rows],
                      [[float(m[key]) for _, key in COLUMNS] for _, m in rows],
                      [title for title, _ in COLUMNS])
    selection = results.get("selection")
    if isinstance(selection, dict):  # which epoch is "best on val", and why
        body += (f"\nselected epoch {selection['epoch']} of {results['epochs']} "
                 f"({selection['rule']}): {selection['reason']}")
    return f"{head}\n{body}\nrun directory: {output_dir}"


__all__ = ["run_summary", "text_table"]
