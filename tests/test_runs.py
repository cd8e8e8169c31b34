"""``jaxdl runs`` and ``jaxdl compare``: run directories read back, listed newest first,
and their differences in settings and results."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jaxdl import cli, report, runs
from jaxdl.validate import InputError


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def root(tiny_runs, tmp_path):
    """A copy of the tiny runs with known creation times (t oldest, then s, then p), an
    unfinished run and a directory that is not a run."""
    src, _ = tiny_runs
    dst = tmp_path / "runs"
    for name, stamp in (("t", 1_000_000), ("s", 2_000_000), ("p", 3_000_000)):
        shutil.copytree(src / name, dst / name)
        os.utime(dst / name / "config.json", (stamp, stamp))
    report.write_json(dst / "crashed" / "config.json", {"command": "train", "epochs": 9})
    os.utime(dst / "crashed" / "config.json", (500_000, 500_000))
    (dst / "notes").mkdir()
    return dst


def test_load_run_kinds(root):
    t, s, p = (runs.load_run(root / n) for n in ("t", "s", "p"))
    assert (t.kind, s.kind, p.kind) == ("train", "sweep", "train")
    assert t.finished and len(t.results["params_digest"]) == 64
    assert len(s.rows) == 4 and s.results["members"] == 4
    crashed = runs.load_run(root / "crashed")
    assert crashed.kind == "train" and not crashed.finished
    with pytest.raises(InputError, match="not a run directory"):
        runs.load_run(root / "notes")


def test_find_runs_newest_first(root):
    assert [r.name for r in runs.find_runs(root)] == ["p", "s", "t", "crashed"]


def test_runs_command_table_and_json(root, capsys):
    code, out, err = _run(capsys, "runs", str(root), "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    table, data = lines[:-1], json.loads(lines[-1])
    assert table[0].split()[:3] == ["run", "kind", "created"]
    assert [line.split()[0] for line in table[2:]] == ["p", "s", "t", "crashed"]
    rows = {r["run"]: r for r in data["runs"]}
    t = json.loads((root / "t" / "results.json").read_text())
    assert rows["t"]["test_accuracy"] == t["test_accuracy"] and rows["t"]["epochs"] == 3
    assert rows["t"]["model"] == "mlp 32-16 relu" and rows["p"]["optimizer"] == "adam lr=0.01"
    assert rows["t"]["optimizer"] == "adam lr=0.001"  # the default, as the run resolved it
    best = json.loads((root / "s" / "summary.json").read_text())["best"]
    assert rows["s"]["members"] == 4 and rows["s"]["test_accuracy"] == best["test_accuracy"]
    assert rows["crashed"]["status"] == "unfinished"
    code, out, _ = _run(capsys, "runs", str(root), "--limit", "1")
    assert [line.split()[0] for line in out.strip().splitlines()[2:]] == ["p"]


def test_compare_prints_only_the_differences(root, capsys):
    code, out, err = _run(capsys, "compare", str(root / "t"), str(root / "p"), "--json")
    assert code == 0, err
    diff = json.loads(out.strip().splitlines()[-1])
    t_res = json.loads((root / "t" / "results.json").read_text())
    p_res = json.loads((root / "p" / "results.json").read_text())
    assert diff["settings"] == {
        "hidden": [[32, 16], [8]],
        "lr": [pytest.approx(1e-3), 0.01],  # t's default, read from its resolved numbers
        "epochs": [3, 2],
        "tensorboard": [True, False],
    }  # not no_plots, json or no_progress: how a run was shown is not a setting
    assert diff["results"]["params_digest"] == [t_res["params_digest"], p_res["params_digest"]]
    assert diff["results"]["epochs_run"] == [3, 2]
    assert "run_dir" not in diff["results"] and "seed" not in diff["settings"]
    text = out.strip().splitlines()[:-1]
    assert text[0].split() == ["settings", "t", "p"]
    assert any(line.split()[:3] == ["epochs", "3", "2"] for line in text)
    assert any(line.startswith("params_digest") for line in text)


def test_compare_a_run_with_itself_and_errors(root, capsys):
    same = runs.differences([runs.load_run(root / "t")] * 2)
    assert same == {"settings": {}, "results": {}}
    code, _, err = _run(capsys, "compare", str(root / "t"))
    assert code == 2 and "at least 2" in err
    code, _, err = _run(capsys, "compare", str(root / "t"), str(root / "notes"))
    assert code == 2 and "not a run directory" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "runs", str(root / "missing"))
    assert code == 2 and "no such directory" in err
