"""The method reference covers every method kdlab ships."""

import re
from pathlib import Path

from kdlab.config import conf_dir

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_every_method_config_has_a_row_in_docs_methods():
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([a-z_0-9]+)`",
                                                                row.split(" | ")[0])}
    shipped = {path.stem for path in (conf_dir() / "method").glob("*.yaml")}
    assert len(shipped) > 20
    assert shipped - documented == set()
