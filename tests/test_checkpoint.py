"""Checkpoints and faults: bit-exact resume after SIGKILL/SIGTERM/SIGINT, corrupt and
half-written checkpoints, refused resumes, NaN losses, sweeps, crashes while writing."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import checkpoint, cli, compiled, member_programs, step, sweep, train
from jaxdl.checkpoint import Checkpointer, CheckpointError

EPOCHS = 8
FLAGS = ["--hidden", "16", "--epochs", str(EPOCHS), "--batch-size", "50", "--dropout-hidden", "0.2",
         "--json", "--no-progress", "--no-plots"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    s = jaxdl.synthetic_splits(200, 60, 60, num_features=784, num_classes=4, seed=2, separation=8.0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    jaxdl.data.save_file(path, s)
    return path


@pytest.fixture(scope="module")
def reference(tiny_npz, tmp_path_factory) -> dict:
    """The uninterrupted run: results, history.json and history.csv."""
    runs = tmp_path_factory.mktemp("ref")
    assert cli.main(["train", "--data", str(tiny_npz), *FLAGS, "--runs-dir", str(runs), "--name", "ref"]) == 0  # fmt: skip
    run = runs / "ref"
    return {
        "results": json.loads((run / "results.json").read_text()),
        "history": (run / "history.json").read_text(),
        "csv": (run / "history.csv").read_text(),
    }


def _start(tiny_npz, runs: Path, name: str) -> subprocess.Popen:
    argv = ["train", "--data", str(tiny_npz), *FLAGS, "--runs-dir", str(runs), "--name", name]
    return subprocess.Popen(
        [sys.executable, "-m", "jaxdl.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _send_after_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, sig: int, epoch: int = 2):
    """Sends ``sig`` as soon as a complete checkpoint of ``epoch`` or later exists."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpt_dir.is_dir() and any(d.name.isdigit() and int(d.name) >= epoch for d in ckpt_dir.iterdir()):  # fmt: skip
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def _assert_same_as_reference(run: Path, res: dict, reference: dict) -> None:
    assert res["params_digest"] == reference["results"]["params_digest"]
    assert res["epochs_run"] == EPOCHS and res["best_epoch"] == reference["results"]["best_epoch"]
    assert res["test_loss"] == reference["results"]["test_loss"]
    assert (run / "history.json").read_text() == reference["history"]
    assert (run / "history.csv").read_text() == reference["csv"]


def test_sigkill_then_resume_is_bit_identical(tiny_npz, reference, tmp_path, run_cli):
    proc = _start(tiny_npz, tmp_path, "k")
    code, _, err = _send_after_checkpoint(proc, tmp_path / "k" / "checkpoints", signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    assert not (tmp_path / "k" / "results.json").exists(), "killed too late to test a resume"
    code, out, err = run_cli("train", "--resume", tmp_path / "k", "--json", "--no-progress")
    assert code == 0, err
    _assert_same_as_reference(tmp_path / "k", json.loads(out.splitlines()[-1]), reference)


def test_resume_with_the_kernels_off_finishes_the_same_run(tiny_npz, reference, tmp_path, run_cli):  # fmt: skip
    """A run checkpointed with the kernels resumes with ``--kernels off`` (XLA alone)."""
    proc = _start(tiny_npz, tmp_path, "x")
    code, _, err = _send_after_checkpoint(proc, tmp_path / "x" / "checkpoints", signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    assert not (tmp_path / "x" / "results.json").exists(), "killed too late to test a resume"
    code, out, err = run_cli(
        "train", "--resume", tmp_path / "x", "--kernels", "off", "--json", "--no-progress"
    )
    assert code == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res["kernels"] == "off" and res["epochs_run"] == EPOCHS
    assert abs(res["test_accuracy"] - reference["results"]["test_accuracy"]) <= 0.005
    assert reference["results"]["kernels"] in ("on", "off")


def test_sigterm_saves_exits_cleanly_and_resumes_bit_identically(tiny_npz, reference, tmp_path, run_cli):  # fmt: skip
    sig = signal.SIGTERM
    proc = _start(tiny_npz, tmp_path, "s")
    ckpts = tmp_path / "s" / "checkpoints"
    code, _, err = _send_after_checkpoint(proc, ckpts, sig, epoch=1)
    assert code == 128 + sig, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(sig).name} after epoch" in lines[-1]
    assert f"--resume {tmp_path / 's'}" in lines[-1]
    stopped_at = int(lines[-1].split("after epoch ")[1].split(";")[0])
    assert stopped_at < EPOCHS and max(int(d.name) for d in ckpts.iterdir()) == stopped_at
    code, out, err = run_cli("train", "--resume", tmp_path / "s", "--json", "--no-progress")
    assert code == 0, err
    _assert_same_as_reference(tmp_path / "s", json.loads(out.splitlines()[-1]), reference)


def test_a_signal_is_acknowledged_in_one_line_where_progress_is_shown(tiny_npz, tmp_path):
    argv = ["train", "--data", str(tiny_npz), *[f for f in FLAGS if f != "--no-progress"],
            "--epochs", "200", "--runs-dir", str(tmp_path), "--name", "p"]  # fmt: skip
    # 200 short epochs: the signal lands well before the last (which would finish the run)
    proc = subprocess.Popen([sys.executable, "-m", "jaxdl.cli", *argv], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    code, _, err = _send_after_checkpoint(proc, tmp_path / "p" / "checkpoints", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    told = [line for line in err.splitlines() if line.startswith("jaxdl: SIGTERM")]
    assert told == ["jaxdl: SIGTERM: stopping after this epoch's checkpoint"], err
    assert "interrupted by SIGTERM after epoch" in err.strip().splitlines()[-1]


# ------------------------------------------------------------------ library-level checkpoints


@pytest.fixture(scope="module")
def small(blobs):
    model = jaxdl.MLP(hidden=(16,), num_classes=3, batch_norm=True)
    opt = jaxdl.make_optimizer("adam", learning_rate=3e-3, schedule="plateau")
    es = jaxdl.EarlyStopping("val_accuracy", None)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=6, batch_size=64, early_stopping=es, dropout=0.2), blobs.train, validation=blobs.valid)  # fmt: skip
    config = checkpoint.describe(setup, hp, blobs.train.x, blobs.train.y)
    return setup, hp, config


def _init(setup, hp, seed=0):
    return compiled.programs(setup).init(jax.random.key(seed), hp)


def _leaves_equal(a, b) -> bool:
    la, lb = (jax.tree_util.tree_leaves(checkpoint._encode(t)) for t in (a, b))
    same = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def test_resume_through_the_api_equals_the_uninterrupted_run(blobs, small, tmp_path):
    setup, hp, config = small
    ref_state, ref_hist = train.fit_state(setup, _init(setup, hp), hp, blobs.train, blobs.valid)
    ck = Checkpointer(tmp_path, config)

    def stop_at_3(epoch, metrics):
        if epoch == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during epoch 3

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(checkpoint.Interrupted, match="SIGINT after epoch 3"), ck.catch_signals():
        train.fit_state(setup, _init(setup, hp), hp, blobs.train, blobs.valid, on_epoch=stop_at_3,
                        checkpointer=ck)  # fmt: skip
    assert signal.getsignal(signal.SIGINT) is before
    saved = Checkpointer(tmp_path, config).restore(_init(setup, hp, seed=9))
    assert saved.epoch == 3 and int(saved.state.epoch) == 3 and int(saved.state.step) == 3 * 8
    assert len(saved.host["train_loss"]) == 3
    assert jax.random.key_impl(saved.state.key) == jax.random.key_impl(ref_state.key)
    state, hist = train.fit_state(setup, saved.state, hp, blobs.train, blobs.valid,
                                  checkpointer=Checkpointer(tmp_path, config), history=saved.host)  # fmt: skip
    assert hist == ref_hist
    assert _leaves_equal(state, ref_state)  # params, Adam moments, batch stats, key, trackers


def test_a_signal_in_the_last_epoch_lets_the_run_finish(blobs, small, tmp_path):
    setup, hp, config = small
    ref_state, ref_hist = train.fit_state(setup, _init(setup, hp), hp, blobs.train, blobs.valid)
    ck = Checkpointer(tmp_path, config)

    def stop_at_last(epoch, metrics):
        if epoch == setup.epochs:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the last epoch

    with ck.catch_signals():
        state, hist = train.fit_state(setup, _init(setup, hp), hp, blobs.train, blobs.valid,
                                      on_epoch=stop_at_last, checkpointer=ck)  # fmt: skip
        assert ck.requested == signal.SIGINT  # caught, and nothing left to stop
    assert hist == ref_hist and _leaves_equal(state, ref_state)
    assert ck.epochs()[-1] == setup.epochs


def test_a_signal_is_announced_while_the_main_thread_waits_outside_python(small, tmp_path):
    # The main thread blocks in C (a read that restarts after the signal, as it would
    # wait for a compiled epoch on an accelerator): only an announcement made while it
    # is still there wakes it; Python's own handler would run after it returns.
    import ctypes
    import threading

    ck = Checkpointer(tmp_path, small[2])
    r, w = os.pipe()
    told = []

    def announce(signum):
        told.append(signum)
        os.write(w, b"now")

    def stop(signum):  # the second signal
        told.append(-signum)
        os.write(w, b"stop")

    def blocked_until_told() -> bytes:
        signal.siginterrupt(signal.SIGINT, False)  # restart the read, stay in C
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        late = threading.Timer(20, os.write, (w, b"late"))  # wakes it if nothing else does
        late.start()
        buf = ctypes.create_string_buffer(8)
        try:
            ctypes.CDLL(None).read(r, buf, 8)
        finally:
            late.cancel()
        return buf.value

    # SIGINT ignored before, as in the processes `--processes N` starts: a second signal
    # must reach `stop` all the same
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ck.catch_signals(announce=announce, stop=stop):
            assert blocked_until_told() == b"now"
            assert ck.requested == signal.SIGINT  # Python's handler, once back in Python
            assert blocked_until_told() == b"stop"  # the second, also while blocked
    finally:
        signal.signal(signal.SIGINT, before)
        os.close(r)
        os.close(w)
    assert told == [signal.SIGINT, -signal.SIGINT] and signal.set_wakeup_fd(-1) == -1
    assert signal.getsignal(signal.SIGINT) == before  # the handlers back after the block


def test_save_restore_round_trip_is_bit_exact(small, tmp_path):
    setup, hp, config = small
    state = _init(setup, hp, seed=4)
    ck = Checkpointer(tmp_path, config)
    ck.save(1, state, {"train_loss": [0.1 + 1e-17, float("nan")]})
    back = ck.restore(_init(setup, hp, seed=5))
    assert _leaves_equal(back.state, state)
    assert back.host["train_loss"][0] == 0.1 + 1e-17 and np.isnan(back.host["train_loss"][1])
    assert jax.random.key_data(back.state.key).tolist() == jax.random.key_data(state.key).tolist()
    hyper = back.state.opt_state.hyperparams
    assert float(hyper["learning_rate"]) == pytest.approx(3e-3)


def test_every_n_epochs_the_best_and_the_last_are_kept(small, tmp_path):
    setup, hp, config = small
    state = _init(setup, hp)
    ck = Checkpointer(tmp_path, config, every=3, max_to_keep=2)
    scores = [0.5, 0.9, 0.6, 0.7, 0.8, 0.65, 0.7]
    for epoch, score in enumerate(scores, 1):
        best = score == max(scores[:epoch])
        ck.after_epoch(epoch, state, {}, score=score, best=best, last=epoch == len(scores))
    # saved: 1, 2 (new bests), 3, 6 (every 3), 7 (last); kept: the 2 latest and the best.
    assert ck.epochs() == [2, 6, 7]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_with_a_warning(small, tmp_path):
    setup, hp, config = small
    states = [_init(setup, hp, seed=s) for s in (1, 2)]
    ck = Checkpointer(tmp_path, config)
    for epoch, st in enumerate(states, 1):
        ck.save(epoch, st, {"epoch": [epoch]})
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated by a crash
    with pytest.warns(UserWarning, match=r"checkpoint .*2 is unreadable .*falling back to epoch 1"):
        back = Checkpointer(tmp_path, config).restore(_init(setup, hp))
    assert back.epoch == 1 and back.host == {"epoch": [1]}
    assert _leaves_equal(back.state, states[0])
    # The unreadable one is kept aside, so the resumed run can save its epoch 2 again.
    assert (tmp_path / "unreadable-2" / "state").is_dir()
    again = Checkpointer(tmp_path, config)
    again.save(2, states[1], {"epoch": [2]})
    assert again.epochs() == [1, 2] and again.restore(_init(setup, hp)).host == {"epoch": [2]}
    shutil.rmtree(tmp_path / "2")
    for f in (tmp_path / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no readable checkpoint"):
        Checkpointer(tmp_path, config).restore(_init(setup, hp))


def test_half_written_checkpoint_is_never_taken_as_the_latest(small, tmp_path):
    setup, hp, config = small
    state = _init(setup, hp)
    ck = Checkpointer(tmp_path, config)
    ck.save(1, state, {"n": [1]})
    with pytest.raises(TypeError):  # dies while writing epoch 2 (its host JSON fails)
        ck.save(2, state, {"n": [object()]})
    assert ck.epochs() == [1]
    # What a SIGKILL in the middle of Orbax's write leaves: an unfinished temporary directory.
    (tmp_path / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    again = Checkpointer(tmp_path, config)
    assert again.epochs() == [1]
    back = again.restore(_init(setup, hp, seed=3))
    assert back.epoch == 1 and _leaves_equal(back.state, state)


def test_incompatible_config_or_versions_are_refused(small, tmp_path, monkeypatch):
    setup, hp, config = small
    state = _init(setup, hp)
    Checkpointer(tmp_path, config).save(1, state, {})
    other = {**config, "data": "0" * 64}
    with pytest.raises(CheckpointError, match=r"other settings \(data differ\)"):
        Checkpointer(tmp_path, other).restore(state)
    real = checkpoint.versions()
    for key, value in (("jax", "0.4.1"), ("optax", "0.0.1"), ("prng_impl", "rbg")):
        monkeypatch.setattr(checkpoint, "versions", lambda k=key, v=value: {**real, k: v})
        with pytest.raises(CheckpointError, match=f"written with {key} {real[key]}, this is {key} {value}"):  # fmt: skip
            Checkpointer(tmp_path, config).restore(state)


# ------------------------------------------------------------------------------ CLI resumes


def test_resume_refusals_exit_2_with_one_line(tiny_npz, tmp_path, monkeypatch, run_cli):
    base = ["train", "--data", tiny_npz, *FLAGS, "--runs-dir", tmp_path]
    assert run_cli(*base, "--name", "done")[0] == 0
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "config.json").write_text((tmp_path / "done" / "config.json").read_text())
    sweep_cfg = json.loads((tmp_path / "done" / "config.json").read_text()) | {"command": "sweep"}
    (tmp_path / "swp").mkdir()
    (tmp_path / "swp" / "config.json").write_text(json.dumps(sweep_cfg))
    (tmp_path / "off").mkdir()
    off_cfg = json.loads((tmp_path / "done" / "config.json").read_text())
    off_cfg["run"]["checkpointing"]["every"] = 0
    (tmp_path / "off" / "config.json").write_text(json.dumps(off_cfg))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"command": "tra')
    cases = [
        ([tmp_path / "done"], "finished already"),
        ([tmp_path / "nowhere"], "expected a run directory with a config.json"),
        ([tmp_path / "swp"], "is not a train run"),
        ([tmp_path / "bad"], "is not valid JSON"),
        ([tmp_path / "off"], "--checkpoint-every 0"),
        ([tmp_path / "part", "--lr", "0.5"], "--lr: "),
        ([tmp_path / "part", "--epochs", "9"], "--epochs: "),
        ([tmp_path / "part", "--hidden", "8"], "--hidden: "),
    ]
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for extra, expect in cases:
        code, _, err = run_cli("train", "--resume", *extra, "--no-progress")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expect in lines[0], (extra, err)
    assert {p: p.read_bytes() for p in snapshot} == snapshot  # nothing was overwritten
    # A checkpoint from other library versions: refused, one line, exit 2.
    shutil.copytree(tmp_path / "done", tmp_path / "v")
    (tmp_path / "v" / "results.json").unlink()
    real = checkpoint.versions()
    monkeypatch.setattr(checkpoint, "versions", lambda: {**real, "flax": "0.1.0"})
    code, _, err = run_cli("train", "--resume", tmp_path / "v", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "flax" in err, err


def test_results_write_crash_loses_nothing_and_resume_finishes(tiny_npz, reference, tmp_path, capsys, monkeypatch, run_cli):  # fmt: skip
    real = os.replace

    def crash_on_results(src, dst):
        if Path(dst).name == "results.json":
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_results)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["train", "--data", str(tiny_npz), *FLAGS, "--runs-dir", str(tmp_path), "--name", "c"])  # fmt: skip
    monkeypatch.setattr(os, "replace", real)
    capsys.readouterr()
    run = tmp_path / "c"
    assert not (run / "results.json").exists()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    assert (run / "history.json").read_text() == reference["history"]  # complete, not truncated
    code, out, err = run_cli("train", "--resume", run, "--json", "--no-progress")
    assert code == 0, err
    _assert_same_as_reference(run, json.loads(out.splitlines()[-1]), reference)


# ----------------------------------------------------------------------------- NaN and Inf


def _poisoned(ds: jaxdl.Dataset, row: int) -> jaxdl.Dataset:
    x = ds.x.copy()
    x[row, 0] = np.nan
    return jaxdl.Dataset(x, ds.y)


def _step_of(setup, key, epoch: int, row: int) -> int:
    """The 1-based global step at which example ``row`` is trained on in ``epoch``."""
    idx, w = step.epoch_order(setup, key, jnp.int32(epoch - 1))
    idx = np.asarray(idx)
    hit = (idx == row) & (np.ones_like(idx, bool) if w is None else np.asarray(w) > 0)
    return (epoch - 1) * setup.steps_per_epoch + int(np.argwhere(hit)[0, 0]) + 1


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(blobs, tmp_path):
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    model = jaxdl.MLP(hidden=(8,), num_classes=3)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=5, batch_size=100), blobs.train)
    config = checkpoint.describe(setup, hp, blobs.train.x, blobs.train.y)
    ck = Checkpointer(tmp_path, config)

    def stop_at_2(epoch, metrics):
        if epoch == 2:
            ck.requested = signal.SIGTERM

    with pytest.raises(checkpoint.Interrupted):
        train.fit_state(setup, _init(setup, hp), hp, blobs.train, on_epoch=stop_at_2, checkpointer=ck)  # fmt: skip
    good = Checkpointer(tmp_path, config).restore(_init(setup, hp))
    expected = _step_of(setup, good.state.key, 3, row=77)
    with pytest.raises(train.NonFiniteError) as info:
        train.fit_state(setup, good.state, hp, _poisoned(blobs.train, 77), checkpointer=ck,
                        history=good.host)  # fmt: skip
    e = info.value
    assert (e.epoch, e.step) == (3, expected)
    batch = expected - 2 * setup.steps_per_epoch
    assert (
        str(e) == f"training loss became NaN/Inf at epoch 3, step {expected} (batch {batch} of 6)"
    )
    assert len(e.history["train_loss"]) == 3 and np.isnan(e.history["train_loss"][-1])
    assert ck.epochs() == [1, 2]  # the bad epoch was never saved
    again = Checkpointer(tmp_path, config).restore(_init(setup, hp))
    assert again.epoch == 2 and all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(again.state.params))  # fmt: skip


def test_skip_nonfinite_skips_exactly_the_bad_steps(blobs):
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    model = jaxdl.MLP(hidden=(8,), num_classes=3)
    data = _poisoned(blobs.train, 300)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=3, batch_size=100, skip_nonfinite=True), blobs.train)  # fmt: skip
    setup = dataclasses.replace(setup, probe_size=100)  # keep the NaN row out of the statistics
    state, hist = train.fit_state(setup, _init(setup, hp), hp, data)
    assert hist["skipped_steps"] == [1.0, 1.0, 1.0]  # the one batch holding row 300, each epoch
    assert int(state.step) == 3 * 6
    assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(state.params))
    assert all(np.isfinite(hist["train_loss"]))
    # One step by value: a bad batch leaves parameters and optimizer state bit-identical.
    start = _init(setup, hp)
    one_step = jax.jit(functools.partial(step.train_step, setup))
    bad = step.Batch(jnp.asarray(data.x[300:400]), jnp.asarray(data.y[300:400]))
    new, m = one_step(start, bad, hp)
    assert bool(m["skipped"]) and float(m["weight"]) == 0.0 and int(new.step) == 1
    assert _leaves_equal(new.params, start.params) and _leaves_equal(new.opt_state, start.opt_state)
    good = step.Batch(jnp.asarray(data.x[:100]), jnp.asarray(data.y[:100]))
    moved, m = one_step(start, good, hp)
    assert not bool(m["skipped"]) and not _leaves_equal(moved.params, start.params)


def test_cli_nan_loss_exits_3_with_one_line_and_keeps_the_history(tiny_npz, tmp_path, run_cli):
    code, _, err = run_cli(
        "train", "--data", tiny_npz, "--hidden", "16", "--epochs", "4", "--optimizer", "sgd",
        "--lr", "1e9", "--runs-dir", tmp_path, "--name", "nan", "--no-progress", "--no-plots",
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1 and "Traceback" not in err, err
    assert "loss became NaN/Inf at epoch " in lines[0] and "--skip-nonfinite" in lines[0]
    epoch = int(lines[0].split("at epoch ")[1].split(",")[0])
    hist = json.loads((tmp_path / "nan" / "history.json").read_text())
    assert len(hist["train_loss"]) == epoch  # the epochs before and the bad one
    assert None in (hist["train_loss"][-1], hist["val_loss"][-1])  # NaN is written as null
    kept = sorted(int(d.name) for d in (tmp_path / "nan" / "checkpoints").iterdir())
    assert max(kept, default=0) == epoch - 1  # the bad epoch was not saved
    code, _, err = run_cli(
        "train", "--data", tiny_npz, "--hidden", "16", "--epochs", "2", "--runs-dir", tmp_path,
        "--name", "skip", "--no-progress", "--no-plots", "--skip-nonfinite",
    )  # fmt: skip
    assert code == 0, err
    hist = json.loads((tmp_path / "skip" / "history.json").read_text())
    assert hist["skipped_steps"] == [0.0, 0.0]  # the flag reaches the training program


# ---------------------------------------------------------------------------------- sweeps


def test_sweep_resume_restores_every_member_including_frozen_and_diverged(blobs, tmp_path):
    small = jaxdl.data.subset(blobs.train, 64)
    configs = [{"learning_rate": 0.5}, {"learning_rate": 1e6}, {"learning_rate": 1e-3}]
    kw = dict(epochs=8, batch_size=16, validation=blobs.valid,
              early_stopping=jaxdl.EarlyStopping("train_accuracy", patience=1))  # fmt: skip
    opt = jaxdl.make_optimizer("sgd")
    config = jaxdl.RunConfig.of(MODEL_S, opt, epochs=8, batch_size=16,
                                early_stopping=kw["early_stopping"])  # fmt: skip
    setup, hp, _, members = sweep.prepare_sweep(config, small, configs, validation=blobs.valid)
    budget = 2 * member_programs.member_bytes(setup, hp)  # two chunks: members (0, 1) and (2,)
    with pytest.warns(UserWarning, match="2 chunks"):
        ref = sweep.sweep(MODEL_S, opt, small, configs, max_memory_bytes=budget, **kw)
    assert ref.chunks == 2 and ref.rows[1]["diverged"] and ref.rows[0]["stopped"]
    config = checkpoint.describe(setup, hp, small.x, small.y, members=members)
    ck = Checkpointer(tmp_path, config)
    calls = []

    def stop(epoch, metrics):
        calls.append(epoch)
        if len(calls) == ref.rows[0]["epochs_run"] + 2:  # in the second chunk, at its epoch 2
            ck.requested = signal.SIGINT

    with (
        pytest.raises(checkpoint.Interrupted, match="SIGINT after epoch 2"),
        pytest.warns(UserWarning),
    ):
        sweep.sweep(MODEL_S, opt, small, configs, max_memory_bytes=budget, on_epoch=stop,
                    checkpointer=ck, **kw)  # fmt: skip
    assert Checkpointer(tmp_path / "chunk-1", {}).epochs()[-1] == 2
    with pytest.warns(UserWarning):
        res = sweep.sweep(MODEL_S, opt, small, configs, max_memory_bytes=budget,
                          checkpointer=Checkpointer(tmp_path, config), **kw)  # fmt: skip
    assert res.rows == ref.rows
    for k in ref.history:
        np.testing.assert_array_equal(res.history[k], ref.history[k])
    assert _leaves_equal(res.states, ref.states)


MODEL_S = jaxdl.MLP(hidden=(16,), num_classes=3)


def test_cli_sweep_resumes_after_a_crash_with_the_same_results(tiny_npz, tmp_path, capsys, monkeypatch, run_cli):  # fmt: skip
    argv = ["sweep", "--data", tiny_npz, "--hidden", "8", "--epochs", "3", "--batch-size", "50",
            "--optimizer", "sgd", "--lr", "0.01,1e7", "--seeds", "2", "--runs-dir", tmp_path,
            "--no-progress", "--no-plots", "--json"]  # fmt: skip
    code, out, err = run_cli(*argv, "--name", "ref")
    assert code == 0, err
    ref = json.loads(out.splitlines()[-1])
    assert ref["diverged"] == 2
    real = os.replace

    def crash_on_results(src, dst):
        if Path(dst).name == "results.csv":
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_results)
    with pytest.raises(OSError, match="disk full"):
        cli.main([str(a) for a in [*argv, "--name", "s"]])
    monkeypatch.setattr(os, "replace", real)
    capsys.readouterr()
    code, out, err = run_cli("sweep", "--resume", tmp_path / "s", "--json", "--no-progress")
    assert code == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res["best"] == ref["best"] and res["diverged"] == 2
    for f in ("results.json", "history.json"):
        assert (tmp_path / "s" / f).read_text() == (tmp_path / "ref" / f).read_text(), f


def test_signal_after_training_lets_the_run_finish(tiny_npz, tmp_path, monkeypatch, run_cli):
    """SIGTERM while the results are written: they are finished, exit 0; the process's own
    handlers are back afterwards. Ctrl-C before training: one line, exit 130."""
    evaluate = train.evaluate

    def evaluate_then_signal(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kw)

    monkeypatch.setattr(train, "evaluate", evaluate_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run_cli("train", "--data", tiny_npz, *FLAGS, "--runs-dir", tmp_path, "--name", "t")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["epochs_run"] == EPOCHS
    assert (tmp_path / "t" / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxdl.data, "load", interrupted)
    code, _, err = run_cli("train", "--data", tiny_npz, *FLAGS, "--runs-dir", tmp_path)
    assert code == 130 and err.strip() == "jaxdl train: interrupted; checkpoints already written are kept"  # fmt: skip
