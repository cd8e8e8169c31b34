"""Every Python block of the README runs as written, each on its own in a fresh
interpreter (a reader may copy any one of them), on slices of real MNIST so that it
stays quick."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# The README's jaxdl.load("mnist") returns the whole data set; here a slice of each split
# (the code is what is checked, not the numbers it prints).
PREAMBLE = """
import jaxdl
from jaxdl import data

_load = data.load


def _slices(name="mnist", **kw):
    s = _load(name, **kw)
    return data.Splits(data.subset(s.train, 600), data.subset(s.valid, 100), data.subset(s.test, 100))


jaxdl.load = data.load = _slices
"""


def blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_blocks_are_found():
    assert blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n") == [
        "x = 1\n",
        "y = 2\n",
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("index", range(len(blocks(README.read_text()))))
def test_each_python_block_of_the_readme_runs_on_its_own(tmp_path, index):
    code = blocks(README.read_text())[index]
    out = subprocess.run(
        [sys.executable, "-c", PREAMBLE + code],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, f"block {index + 1}:\n{code}\n{out.stderr[-3000:]}"
    if "checkpoint.Checkpointer(" in code:
        assert (tmp_path / "ckpt").is_dir()  # the checkpoint block wrote its checkpoints


def test_the_readme_has_its_blocks():
    assert len(blocks(README.read_text())) >= 5
