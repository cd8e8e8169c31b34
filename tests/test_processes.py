"""Sweeps over several processes (jax.distributed, CPU collectives): 2 local processes with
2 CPU devices each give the rows of 1 process with 4 (grid, halving, PBT); a killed
process ends the run with one line, and ``--resume`` completes it with the same rows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxdl
from jaxdl.cli.processes import _free_port, launch
from jaxdl.processes import HEARTBEAT_SECONDS
from jaxdl.validate import InputError

# 400 training rows in minibatches of 10: 40 steps an epoch, long enough to kill a
# process between two epochs.
SWEEP = ["sweep", "--hidden", "16", "--epochs", "20", "--batch-size", "10",
         "--lr", "1e-3,1e-2,3e-2", "--seeds", "2", "--json", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    s = jaxdl.synthetic_splits(
        400, 100, 100, num_features=20, num_classes=4, seed=2, separation=4.0
    )
    return jaxdl.data.save_file(tmp_path_factory.mktemp("data") / "d.npz", s)


def _jaxdl(*argv: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxdl.cli", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> list[dict]:
    """The sweep's rows from one process with 4 CPU devices."""
    runs = tmp_path_factory.mktemp("runs")
    code, out, err = _finish(_jaxdl(*SWEEP, "--data", str(data), "--runs-dir", str(runs),
                                    "--name", "one", "--cpu-devices", "4"))  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["processes"] == 1 and summary["devices"] == 4
    return json.loads((runs / "one" / "results.json").read_text())


def _children(pid: int) -> dict[int, int]:
    """The process id (``--process-id``) of each child of ``pid``, by its pid."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        out[int(argv[argv.index(b"--process-id") + 1])] = int(child)
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_a_killed_process_ends_the_run_and_resume_completes_it(data, tmp_path, one_process):
    run = tmp_path / "k"
    p = _jaxdl(*SWEEP, "--data", str(data), "--runs-dir", str(tmp_path), "--name", "k",
               "--processes", "2", "--cpu-devices", "2")  # fmt: skip
    chunk = run / "checkpoints" / "chunk-0"
    deadline = time.monotonic() + 180
    while not (chunk.exists() and any(d.name.isdigit() for d in chunk.iterdir())):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    os.kill(_children(p.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    code, out, err = _finish(p, timeout=2 * HEARTBEAT_SECONDS)
    assert time.monotonic() - killed < 60
    said = err.strip().splitlines()[-1]
    assert code == 1 and out == ""
    last = max(int(d.name) for d in chunk.iterdir() if d.name.isdigit())
    assert said == (f"jaxdl sweep: process 1 of 2 was killed by SIGKILL; stopped the others; "
                    f"continue from the run's last checkpoint (epoch {last}) with: jaxdl sweep "
                    f"--resume {run} --processes 2")  # fmt: skip
    assert not (run / "results.json").exists()
    code, out, err = _finish(_jaxdl("sweep", "--resume", str(run), "--processes", "2", "--json"))
    assert code == 0, err
    lines = out.splitlines()
    # Process 0 alone prints: the member table, its 3-line summary, the JSON (no Gloo lines).
    assert lines[0].startswith("learning_rate") and len(lines) == 2 + 6 + 3 + 1
    summary = json.loads(lines[-1])
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["compiles"] == 1
    assert json.loads((run / "results.json").read_text()) == one_process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # one run directory


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--num-processes", "2"], "--num-processes/--process-id need --coordinator HOST:PORT"),
        (["--coordinator", "nohost"], "--coordinator: expected HOST:PORT"),
        (["--coordinator", "127.0.0.1:1"], "give --num-processes N and --process-id I too"),
        (
            ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id: expected 0 to 1, got 2",
        ),  # fmt: skip
        (["--processes", "0"], "--processes: expected an integer > 0, got 0"),
        (["--coordinator", "auto"], "--coordinator auto: cannot join: "),
        (
            ["--coordinator", "127.0.0.1:99999", "--num-processes", "2", "--process-id", "0"],
            "a port from 1 to 65535",
        ),  # fmt: skip
        (["--processes", "2", "--coordinator", "127.0.0.1:1"], "starts the processes itself"),
        (["--processes", "2", "--process-id", "1"], "starts the processes itself"),
    ],
)
def test_bad_process_flags_exit_2_with_one_line(flags, expect, data, tmp_path, run_cli):
    code, out, err = run_cli("sweep", "--data", str(data), "--hidden", "4", "--epochs", "1",
                             "--runs-dir", str(tmp_path), *flags)  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("jaxdl sweep: error")]
    assert code == 2 and len(errors) == 1 and expect in errors[0], err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_the_local_start_gives_each_process_the_same_flags_and_its_id(tmp_path, monkeypatch):
    started = []

    class Child:
        def __init__(self, argv, stdout=None, env=None):
            started.append((argv, stdout))
            assert env["JAX_PLATFORMS"] == "cpu"  # also on a host with accelerators

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    a = jaxdl.cli.build_parser().parse_args(["sweep", "--processes", "3", "--cpu-devices", "2"])
    assert launch(a, ["sweep", "--lr", "1e-3", "--processes", "3"], tmp_path / "r", True) == 0
    assert len(started) == 3
    for i, (argv, stdout) in enumerate(started):
        tail = argv[argv.index("--lr") + 2 :]
        assert tail[:7] == [
            "--processes",
            "3",
            "--processes",
            "1",
            "--launched",
            "--cpu-devices",
            "2",
        ]
        assert tail[tail.index("--process-id") + 1] == str(i)
        assert tail[tail.index("--num-processes") + 1] == "3"
        assert (stdout is None) == (i == 0)  # process 0's stdout is the command's
        assert ("--no-progress" in tail) == (i > 0)


_SEARCHES = """
import json, sys
import jax
import jaxdl
from jaxdl import pbt, sweep

n, i, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jaxdl.use_cpu_cores(4 // n)
if n > 1:
    jaxdl.processes.join(f"127.0.0.1:{port}", n, i)
data = jaxdl.synthetic_splits(200, 100, 100, num_features=12, num_classes=3, seed=0)
configs = sweep.grid(learning_rate=[1e-3, 1e-2, 3e-2, 1e-1])
model, sgd = jaxdl.MLP(hidden=(8,), num_classes=3), jaxdl.make_optimizer("sgd")
shared = dict(seeds=2, validation=data.valid, test=data.test, verbose=False)
grid = sweep.sweep(model, sgd, data.train, configs, epochs=4, batch_size=20, **shared)
halving = sweep.sweep(model, sgd, data.train, configs, epochs=4, batch_size=20,
                      search="halving", eta=2, **shared)
config = jaxdl.RunConfig.of(model, sgd, epochs=4, batch_size=20)
population = pbt.pbt(config, data.train, configs, ready_every=1, **shared)
# one seed: one shared order, members in blocks of one on each device (2 each)
jaxdl.member_programs.BLOCK_BYTES = 1
eight = sweep.grid(learning_rate=[1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 5e-2, 8e-2, 1e-1])
blocks = sweep.sweep(model, sgd, data.train, eight, epochs=3, batch_size=20,
                     **{**shared, "seeds": [0]})
try:  # process 1 with other data: both refuse
    blobs = jaxdl.synthetic_splits(200, 1, 1, num_features=12, num_classes=3, seed=1)
    other = data.train if i == 0 else blobs.train
    sweep.prepare_sweep(config, other, configs)
    refused = None
except jaxdl.validate.InputError as e:
    refused = str(e)
rows = {"refused": refused, "grid": grid.rows, "halving": halving.rows, "pbt": population.rows, "devices": grid.devices,
        "blocks": blocks.rows,
        "source": population.lineage["source"].tolist()}
if jax.process_index() == 0:
    json.dump(rows, open(out, "w"))
"""


def test_grid_halving_and_pbt_over_two_processes_from_python_equal_one_process(tmp_path):
    script = tmp_path / "searches.py"
    script.write_text(_SEARCHES)
    port = str(_free_port())
    two = [subprocess.Popen([sys.executable, str(script), "2", str(i), port, str(tmp_path / "two.json")],
                            stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    one = subprocess.run([sys.executable, str(script), "1", "0", "0", str(tmp_path / "one.json")],
                         stderr=subprocess.PIPE, text=True, timeout=240)  # fmt: skip
    assert one.returncode == 0, one.stderr
    for p in two:
        assert p.wait(timeout=240) == 0, p.stderr.read()
        p.stderr.close()
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert one.pop("refused") is None
    assert two.pop("refused") == (
        "processes differ from process 0 (data: process 1); every process must be given the "
        "same data and settings, and run the same jaxdl and kernels"
    )
    assert one == two and one["devices"] == 4 and len(one["grid"]) == len(one["blocks"]) == 8
    assert sorted(r["rung"] for r in one["halving"]) == [0, 0, 0, 0, 1, 1, 2, 2]


def test_a_process_whose_peers_never_join_ends_with_one_line(tmp_path):
    script = tmp_path / "alone.py"
    script.write_text(
        "from jaxdl import processes\n"
        "processes.CONNECT_SECONDS = 2\n"
        f"processes.join('127.0.0.1:{_free_port()}', 2, 0)\n"
    )
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert (
        p.stderr.strip().splitlines()[-1].startswith("jaxdl: error: --coordinator 127.0.0.1:")
        and "not all of the 2 processes joined within 2 s" in p.stderr
    )


def test_processes_that_differ_are_named_with_what_differs(monkeypatch):
    # Three processes' hashes as process_allgather returns them: process 2 runs other
    # kernels (a lowering outside the settings' repr), process 1 has other data.
    from jax.experimental import multihost_utils

    from jaxdl import processes

    parts = {"data": "d0", "settings": "s", "lowering": "L(gemm=True)"}
    others = [parts, {**parts, "data": "d1"}, {**parts, "lowering": "L(gemm=False)"}]

    def gather(mine):
        def rows(p):
            return np.stack([np.frombuffer(hashlib.sha256(v.encode()).digest(), np.uint8)
                             for v in p.values()])  # fmt: skip

        assert np.array_equal(mine, rows(parts))
        return np.stack([rows(p) for p in others])

    monkeypatch.setattr(processes, "several", lambda: True)
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    with pytest.raises(InputError) as e:
        processes.check_same(parts)
    assert str(e.value) == (
        "processes differ from process 0 (data: process 1; lowering: process 2); every "
        "process must be given the same data and settings, and run the same jaxdl and kernels"
    )
    others[1] = others[2] = parts
    processes.check_same(parts)  # the same everywhere: no error
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda v: np.asarray([[7], [3], [5]]))
    assert processes.smallest(7) == 3


def test_the_resume_hint_names_how_the_processes_were_started(monkeypatch):
    from jaxdl import processes
    from jaxdl.cli.processes import again

    parse = jaxdl.cli.build_parser().parse_args
    assert again(parse(["sweep"])) == ""  # one process
    monkeypatch.setattr(processes, "count", lambda: 3)
    assert again(parse(["sweep", "--processes", "1", "--launched"])) == " --processes 3"
    assert again(parse(["sweep", "--coordinator", "h:1"])) == (
        " in each of the 3 processes, with its --coordinator, --num-processes and --process-id"
    )


def test_the_death_line_names_where_the_checkpoints_have_got_to(tmp_path):
    from jaxdl.cli.processes import _last_checkpoint

    assert _last_checkpoint(tmp_path) is None
    for d in ("chunk-0/3", "chunk-0/5", "chunk-0/tmp"):
        (tmp_path / d).mkdir(parents=True)
    assert _last_checkpoint(tmp_path) == "epoch 5"
    for d in ("chunk-1/1", "chunk-1/2"):  # the next chunk, behind the first
        (tmp_path / d).mkdir(parents=True)
    assert _last_checkpoint(tmp_path) == "chunk-1, epoch 2"


def test_a_bad_input_in_one_process_stops_every_process_with_one_line(data, tmp_path):
    def run(*per_process: list[str]) -> list[tuple[int, str, str]]:
        port = str(_free_port())
        started = [
            _jaxdl(
                *SWEEP,
                "--epochs",
                "1",
                "--cpu-devices",
                "1",
                "--runs-dir",
                str(tmp_path),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                *flags,
            )  # fmt: skip
            for i, flags in enumerate(per_process)
        ]
        return [_finish(p, timeout=120) for p in started]

    # process 1's data is not on its host
    missing = str(tmp_path / "nowhere.npz")
    (c0, _, e0), (c1, _, e1) = run(["--data", str(data)], ["--data", missing])
    assert (c0, c1) == (2, 2), (e0, e1)
    assert e0.strip().splitlines()[-1] == (
        "jaxdl sweep (process 0): error: another process could not load its data (it says why)"
    )
    assert e1.strip().splitlines()[-1].startswith("jaxdl sweep (process 1): error: data file ")
    # process 0 cannot make the run directory (its name is taken)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    (c0, _, e0), (c1, _, e1) = run(*[["--data", str(data), "--name", "taken"]] * 2)
    assert (c0, c1) == (2, 2), (e0, e1)
    assert "already exists; pick another --name" in e0.strip().splitlines()[-1]
    assert e1.strip().splitlines()[-1] == (
        "jaxdl sweep (process 1): error: process 0 could not make the run directory (it says why)"
    )
