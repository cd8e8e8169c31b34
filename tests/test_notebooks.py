"""The study notebooks are up to date with their generator. They are executed, top to
bottom in quick mode on real MNIST, by tests/test_experiments.py, which checks the
studies' numbers from those runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_match_their_generator():
    pytest.importorskip("nbformat")
    gen = _generator()
    assert sorted(gen.STUDIES) == NAMES
    assert gen.main(["--check"]) == 0, "run: python notebooks/make_notebooks.py"


def test_every_notebook_is_executed_by_the_study_tests():
    import re

    tests = (Path(__file__).parent / "test_experiments.py").read_text()
    assert sorted(set(re.findall(r'_study\("([a-z_0-9]+)"', tests))) == NAMES
