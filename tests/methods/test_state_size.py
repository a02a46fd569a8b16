"""Every method's declared data-sized state (``Method.state_buffers``) against the buffers its
``setup`` and ``on_fit_start`` really make, for small N and C: the same names, shapes and
dtypes, and the same bytes (numel x element size, summed over the real buffers); and every
buffer whose size follows N or C is declared."""

from __future__ import annotations

import pytest
import torch
from helpers.context import FakeContext

from kdlab.config import compose, conf_dir
from kdlab.methods import instantiate_method
from kdlab.methods.base import StateSizes
from kdlab.models import build_model
from kdlab.models.features import PENULTIMATE, feature_shapes

METHODS = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
VARIANTS = {f"pskd {' '.join(o)}": ["method=pskd", *(f"method.{x}" for x in o)]
            for o in (("precision=float16",), ("store=topk", "top_k=3"),
                      ("store=topk", "top_k=3", "precision=float16"))}
CONFIGS = {**{name: [f"method={name}"] for name in METHODS}, **VARIANTS}
# Methods whose state grows with the data (the rest declare none).
STATEFUL = {"alm_kd", "crd", "nd", "nd_dkd", "pskd", "tgeo_kd", *VARIANTS}


def set_up(overrides: list[str], n: int, c: int):
    """The method after the hooks a fit runs first, on random image data (N train examples,
    C classes, every class present) with a cnn student and teacher; and the sizes it saw."""
    method = instantiate_method(compose(overrides).method)
    torch.manual_seed(0)
    student = build_model("cnn", c, (1, 8, 8), width=4)
    teacher = build_model("cnn", c, (1, 8, 8), width=8).eval()
    g = torch.Generator().manual_seed(0)
    data = {split: (torch.rand(size, 1, 8, 8, generator=g), torch.arange(size) % c)
            for split, size in (("train", n), ("meta", 2 * c), ("val", 2 * c))}
    ctx = FakeContext(student, (teacher,), num_classes=c, data=data)
    method.setup(ctx)
    method.on_fit_start(ctx)
    (width,) = feature_shapes(teacher, (PENULTIMATE,), (1, 8, 8))[PENULTIMATE]
    return method, StateSizes(n, c, num_teachers=1, teacher_width=width)


def real_bytes(method, names) -> int:
    buffers = dict(method.named_buffers())
    return sum(buffers[name].numel() * buffers[name].element_size() for name in names)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_declared_state_is_the_buffers_setup_makes(config):
    small, small_sizes = set_up(CONFIGS[config], n=24, c=4)
    large, large_sizes = set_up(CONFIGS[config], n=40, c=6)
    # the buffers whose size follows N or C, found by building twice
    grown = {name for (name, a), (_, b) in zip(small.named_buffers(), large.named_buffers(),
                                               strict=True) if a.numel() != b.numel()}
    for method, sizes in ((small, small_sizes), (large, large_sizes)):
        declared = method.state_buffers(sizes)
        assert set(declared) == grown
        assert bool(declared) == (config in STATEFUL)
        buffers = dict(method.named_buffers())
        for name, buffer in declared.items():
            assert tuple(buffers[name].shape) == buffer.shape, name
            assert buffers[name].dtype == buffer.dtype, name
            if buffer.rows:
                rows = sizes.num_examples if buffer.rows == "example" else sizes.num_classes
                assert buffers[name].shape[0] == rows, name
        assert sum(b.nbytes for b in declared.values()) == real_bytes(method, declared)


def test_pskd_bytes_per_example_by_hand():
    """float32 full: C floats and a flag; top-k in float16: k halves, k int16 ids, a flag."""
    n, c = 1000, 100
    sizes = StateSizes(n, c)
    full = instantiate_method(compose(["method=pskd"]).method).state_buffers(sizes)
    topk = instantiate_method(compose(["method=pskd", "method.store=topk", "method.top_k=10",
                                       "method.precision=float16"]).method).state_buffers(sizes)
    assert sum(b.nbytes for b in full.values()) == n * (4 * c + 1)
    assert sum(b.nbytes for b in topk.values()) == n * (2 * 10 + 2 * 10 + 1)
    assert {name: b.bytes_per_row for name, b in topk.items()} == {
        "memory": 20, "memory_classes": 20, "has_memory": 1}
    # more classes than int16 holds: the ids take int32
    wide = instantiate_method(compose(["method=pskd", "method.store=topk"]).method)
    assert wide.state_buffers(StateSizes(n, 40_000))["memory_classes"].dtype == torch.int32


def test_docs_memory_table_is_the_declarations_at_imagenet_scale():
    """docs/methods.md's memory table is scripts/state_memory.py's output (so it follows the
    declarations), and its PS-KD figures are the hand counts at N = 1,281,167, C = 1000."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("state_memory",
                                                  root / "scripts" / "state_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = (root / "docs" / "methods.md").read_text()
    begin = "<!-- scripts/state_memory.py: begin -->\n"
    end = "\n<!-- scripts/state_memory.py: end -->"
    assert docs.count(begin) == 1 and docs.count(end) == 1
    table = docs.split(begin)[1].split(end)[0]
    assert table == script.table(), "rerun: python scripts/state_memory.py"
    rows = {line.split(" | ")[0]: line for line in table.splitlines()}
    n, c = 1_281_167, 1000
    assert f"{n * (4 * c + 1) / 1e6:,.1f} MB" in rows["| `pskd`"]
    topk = rows["| `pskd` (store=topk, precision=float16)"]
    assert f"{n * (2 * 10 + 2 * 10 + 1) / 1e6:,.1f} MB" in topk and n * 41 < 1.5e9
