"""Fault injection: kill, interrupt, corrupt and poison `jaxdl train` runs; count what survives.

Every fault is injected into a real run of the command line (a subprocess) on a small
synthetic data set, and the run is then resumed with `jaxdl train --resume`. A run
*survives* when its final `params_digest`, `history.json` and `history.csv` are
bit-identical to an uninterrupted run's; anything else counts as *lost*.

    python experiments/faults.py            # 10 tries per fault
    python experiments/faults.py --quick    # 2 tries per fault
    python experiments/faults.py --json     # one JSON object as the last line
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxdl
from jaxdl import data
from jaxdl.validate import InputError

EPOCHS = 10
FLAGS = ["--hidden", "32", "--epochs", str(EPOCHS), "--batch-size", "50", "--dropout-hidden", "0.2",
         "--no-plots", "--no-progress"]  # fmt: skip


def jaxdl_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "jaxdl.cli", *map(str, argv)]


def outputs(run: Path) -> tuple[str, str, str]:
    digest = json.loads((run / "results.json").read_text())["params_digest"]
    return digest, (run / "history.json").read_text(), (run / "history.csv").read_text()


def start(npz: Path, runs: Path, name: str, *extra) -> subprocess.Popen:
    argv = jaxdl_cmd("train", "--data", npz, *FLAGS, "--runs-dir", runs, "--name", name, *extra)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoints(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def signal_run(npz, runs, name, sig, window: float, rng, min_checkpoints=1):
    """Starts a run and sends ``sig`` at a random time within ``window`` seconds after
    its ``min_checkpoints``-th checkpoint appeared. Returns (returncode, stderr)."""
    proc = start(npz, runs, name)
    while proc.poll() is None and len(checkpoints(runs / name)) < min_checkpoints:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, window))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate()
    return proc.returncode, err


def resume(run: Path) -> tuple[int, str]:
    out = subprocess.run(jaxdl_cmd("train", "--resume", run), capture_output=True, text=True)
    return out.returncode, out.stderr


def verdict(run: Path, reference, resume_rc: int | None = None) -> str:
    if resume_rc not in (None, 0) or not (run / "results.json").exists():
        return "lost"
    return "survived" if outputs(run) == reference else "lost"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=10, help="tries per fault")
    p.add_argument("--quick", action="store_true", help="2 tries per fault")
    p.add_argument("--json", action="store_true", help="print a JSON summary last")
    p.add_argument("--seed", type=int, default=0, help="seed of the injection times")
    p.add_argument("--out", type=Path, default=Path("experiments/results/faults"),
                   help="where results.json is written")  # fmt: skip
    a = p.parse_args(argv)
    tries = 2 if a.quick else a.tries
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="jaxdl-faults-"))
    s = jaxdl.synthetic_splits(400, 100, 100, num_features=784, num_classes=4, seed=1)
    npz = tmp / "d.npz"
    jaxdl.data.save_file(npz, s)
    runs = tmp / "runs"
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    # Reference, twice in separate processes: determinism run to run.
    t0 = time.perf_counter()
    proc = start(npz, runs, "ref")
    while proc.poll() is None and not checkpoints(runs / "ref"):
        time.sleep(0.002)
    t_first = time.perf_counter()
    proc.communicate()
    window = time.perf_counter() - t_first  # how long training runs after the first checkpoint
    reference = outputs(runs / "ref")
    for i in range(tries):
        start(npz, runs, f"same{i}").communicate()
        table["same seed, separate process"][verdict(runs / f"same{i}", reference)] += 1
    print(f"reference: {time.perf_counter() - t0:.1f}s, training window {window:.2f}s", file=sys.stderr)  # fmt: skip

    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        fault = f"{signal.Signals(sig).name} at a random time during training"
        for i in range(tries):
            run = runs / f"{sig.name.lower()}{i}"
            rc, err = signal_run(npz, runs, run.name, sig, 0.7 * window, rng)
            if (run / "results.json").exists():  # the signal came once training was over
                ok = outputs(run) == reference  # (rc may say it died just after writing)
                table[fault]["finished anyway (signal after training)" if ok else "lost"] += 1
                continue
            clean = sig == signal.SIGKILL or (rc == 128 + sig and "Traceback" not in err)
            rrc, _ = resume(run)
            table[fault][verdict(run, reference, rrc) if clean else "lost"] += 1

    fault = "corrupt latest checkpoint (SIGKILL, then truncate its files)"
    for i in range(tries):
        run = runs / f"corrupt{i}"
        signal_run(npz, runs, run.name, signal.SIGKILL, window / 2, rng, min_checkpoints=2)
        kept = checkpoints(run)
        if (run / "results.json").exists() or len(kept) < 2:
            table[fault]["not injected (finished before the kill)"] += 1
            continue
        for f in (run / "checkpoints" / str(kept[-1])).rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        rrc, err = resume(run)
        warned = "unreadable" in err and f"falling back to epoch {kept[-2]}" in err
        table[fault][verdict(run, reference, rrc) if warned else "lost"] += 1

    # A rate at which the loss grows for a few epochs before it overflows, so the run
    # has good checkpoints to keep (the epochs it died at are counted too).
    fault = "NaN loss (sgd, learning rate 30: diverges after a few epochs)"
    died_at = collections.Counter()
    for i in range(tries):
        name = f"nan{i}"
        out = subprocess.run(
            jaxdl_cmd("train", "--data", npz, *FLAGS, "--runs-dir", runs, "--name", name,
                      "--optimizer", "sgd", "--lr", "30", "--seed", i),
            capture_output=True, text=True,
        )  # fmt: skip
        lines = out.stderr.strip().splitlines()
        hist = json.loads((runs / name / "history.json").read_text())
        epoch = len(hist["train_loss"])
        died_at[epoch] += 1
        ok = out.returncode == 3 and len(lines) == 1 and f"at epoch {epoch}," in lines[0]
        ok = ok and max(checkpoints(runs / name), default=0) == epoch - 1
        ok = ok and (epoch == 1 or f"last good checkpoint is epoch {epoch - 1}" in lines[0])
        table[fault]["survived" if ok else "lost"] += 1
    table[fault]["died at epoch (count)"] = dict(sorted(died_at.items()))

    fault = "results write crashes (os.replace fails), then resume"
    for i in range(tries):
        name = f"crash{i}"
        target = ["history.json", "history.csv", "results.json"][i % 3]
        code = (
            "import os, sys\nfrom jaxdl import cli, report\nreal = os.replace\n"
            f"def boom(s, d):\n    if str(d).endswith({target!r}): raise OSError('disk full')\n"
            "    return real(s, d)\nreport.os.replace = boom\n"
            f"sys.exit(cli.main({['train', '--data', str(npz), *FLAGS, '--runs-dir', str(runs), '--name', name]!r}))\n"
        )  # fmt: skip
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        run = runs / name
        intact = all(json.loads(f.read_text()) is not None for f in run.glob("*.json"))
        intact = intact and not list(run.glob(".*.tmp"))
        rrc, _ = resume(run)
        table[fault][verdict(run, reference, rrc) if intact else "lost"] += 1

    # Damaged data file: every byte of an .npz set to random values, read with load_file.
    fault = "data file with one byte changed (every byte, 4 other values)"
    arrays = {f"{v}_{k}": getattr(getattr(s, k), v)[:5, :8] if v == "x" else getattr(getattr(s, k), v)[:5]
              for k in ("train", "valid", "test") for v in "xy"}  # fmt: skip
    np.savez(tmp / "small.npz", **arrays)
    raw = (tmp / "small.npz").read_bytes()
    for pos in range(len(raw)):
        for value in rng.sample([v for v in range(256) if v != raw[pos]], 4):
            damaged = bytearray(raw)
            damaged[pos] = value
            (tmp / "bad.npz").write_bytes(bytes(damaged))
            try:
                back = data.load_file(tmp / "bad.npz")
            except InputError:
                table[fault]["clear error"] += 1
                continue
            except Exception:  # noqa: BLE001 (what this experiment counts)
                table[fault]["lost"] += 1
                continue
            same = all(
                np.array_equal(getattr(ds, v), arrays[f"{v}_{k}"])
                for k, ds in zip(("train", "valid", "test"), back, strict=True)
                for v in "xy"
            )
            table[fault]["read back unchanged" if same else "lost"] += 1

    rows = {k: dict(v) for k, v in table.items()}
    for fault, counts in rows.items():
        n = sum(v for v in counts.values() if isinstance(v, int))
        print(f"{fault}: {n} tried; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    summary = {"tries_per_fault": tries, "faults": rows, "directory": str(tmp)}
    a.out.mkdir(parents=True, exist_ok=True)
    jaxdl.report.write_json(a.out / "results.json", summary)
    if a.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
