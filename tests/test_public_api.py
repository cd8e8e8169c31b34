"""The public API: what ``import jaxdl`` loads, and that studies, benchmarks and notebooks
reach jaxdl only through public names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import jaxdl

ROOT = Path(__file__).resolve().parents[1]


def test_import_jaxdl_loads_no_plotting_library_and_plots_load_on_use():
    code = (
        "import sys, jaxdl\n"
        "assert 'matplotlib' not in sys.modules, 'import jaxdl imported matplotlib'\n"
        "from jaxdl import report\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert callable(report.save_figure) and 'matplotlib' in sys.modules\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


def test_every_public_name_resolves():
    for name in jaxdl.__all__:
        assert getattr(jaxdl, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'plot_nothing'"):
        jaxdl.report.plot_nothing  # noqa: B018


def _sources():
    for folder in ("experiments", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            yield path, path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path, "\n".join(line for line in code.splitlines() if not line.startswith(("%", "!")))


def private_uses(source: str) -> list[str]:
    """``name._private`` where ``name`` was imported from jaxdl, and ``from jaxdl... import
    _private``: the uses of jaxdl's private names in ``source``."""
    tree = ast.parse(source)
    names, found = set(), []  # found: (line, text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.startswith("jaxdl")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxdl"):
            names |= {a.asname or a.name for a in node.names}
            found += [(node.lineno, f"from {node.module} import {a.name}")
                      for a in node.names if a.name[0] == "_"]  # fmt: skip
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in names:
                found.append((node.lineno, f"{ast.unparse(node)} (line {node.lineno})"))
    return [text for _, text in sorted(found)]


def test_private_uses_are_found():
    src = "from jaxdl import report\nimport jaxdl\nreport._x(1)\njaxdl.sweep._y\nimport os\nos._exit\n"
    assert private_uses(src) == ["report._x (line 3)", "jaxdl.sweep._y (line 4)"]


@pytest.mark.parametrize("path,source", list(_sources()), ids=lambda v: getattr(v, "name", ""))
def test_studies_benchmarks_and_notebooks_use_only_public_names(path, source):
    assert private_uses(source) == [], path
