"""Static guarantees: every torch.load is weights_only, no eval/exec of strings."""

import ast
from pathlib import Path

import kdlab

SOURCES = [p for root in (Path(kdlab.__file__).parent, Path(__file__).parents[1] / "scripts")
           for p in root.rglob("*.py")]


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path, node


def test_every_torch_load_sets_weights_only():
    calls = list(_calls("torch.load"))
    assert calls
    for path, node in calls:
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        # True, or the documented opt-in `not allow_pickle` of teacher loading
        assert kw.get("weights_only") in ("True", "not allow_pickle"), f"{path}:{node.lineno}"


def test_no_eval_or_exec_or_raw_pickle():
    for name in ("eval", "exec", "pickle.load", "pickle.loads"):
        assert not list(_calls(name)), name
