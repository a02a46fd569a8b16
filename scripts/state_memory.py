"""The memory each method's data-sized state takes per DDP rank, as a markdown table, from the
methods' own declarations (``Method.state_buffers``: shapes and dtypes as ``setup`` makes
them). docs/methods.md holds the table for ImageNet (N = 1,281,167, C = 1000);
tests/methods/test_state_size.py checks that it is this script's output.

    python scripts/state_memory.py                          # ImageNet: N = 1,281,167, C = 1000
    python scripts/state_memory.py --examples 50000 --classes 100 --teacher-width 256

Every rank holds the whole state (DDP ranks gather what the others computed), so the figure is
the same on 1 or 8 ranks.
"""

from __future__ import annotations

import argparse

from kdlab.config import compose, conf_dir
from kdlab.methods import instantiate_method
from kdlab.methods.base import StateBuffer, StateSizes

IMAGENET = StateSizes(num_examples=1_281_167, num_classes=1000, num_teachers=1,
                      teacher_width=512)
# Settings besides the defaults that change a method's state (PS-KD's stores).
VARIANTS = (("pskd", "precision=float16"), ("pskd", "store=topk"),
            ("pskd", "store=topk", "precision=float16"))


def configs() -> list[tuple[str, ...]]:
    """(method, setting, ...) for every shipped method config, each followed by its variants."""
    names = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
    return sorted([(name,) for name in names] + list(VARIANTS), key=lambda c: c[0])


def describe(name: str, buffer: StateBuffer) -> str:
    kind = str(buffer.dtype).removeprefix("torch.")
    if not buffer.rows:
        return f"`{name}` {kind}, {buffer.shape[0]:,} values"
    return f"`{name}` {kind}, {buffer.bytes_per_row:,} B per {buffer.rows}"


def megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def table(sizes: StateSizes = IMAGENET) -> str:
    """The markdown table: one row per method config with data-sized state."""
    lines = ["| method (settings) | state: dtype, bytes per row | bytes per example "
             "| bytes per class | memory per rank |", "|---|---|---|---|---|"]
    for name, *settings in configs():
        overrides = [f"method={name}", *(f"method.{s}" for s in settings)]
        state = instantiate_method(compose(overrides).method).state_buffers(sizes)
        if not state:
            continue
        per = {rows: sum(b.bytes_per_row for b in state.values() if b.rows == rows)
               for rows in ("example", "class")}
        label = f"`{name}`" + (f" ({', '.join(settings)})" if settings else "")
        lines.append(" | ".join([
            f"| {label}", "; ".join(describe(k, b) for k, b in state.items()),
            f"{per['example']:,}" if per["example"] else "—",
            f"{per['class']:,}" if per["class"] else "—",
            megabytes(sum(b.nbytes for b in state.values())) + " |"]))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=IMAGENET.num_examples, help="N train")
    p.add_argument("--classes", type=int, default=IMAGENET.num_classes, help="C")
    p.add_argument("--teachers", type=int, default=IMAGENET.num_teachers, help="K")
    p.add_argument("--teacher-width", type=int, default=IMAGENET.teacher_width,
                   help="the teacher's penultimate feature width (ND's class means)")
    args = p.parse_args(argv)
    print(table(StateSizes(args.examples, args.classes, args.teachers, args.teacher_width)))


if __name__ == "__main__":
    main()
