"""Run directories as data: find them, read them, list them, compare them (host side).

A run directory is what ``jaxdl train``, ``sweep`` or ``ensemble`` writes: ``config.json``
and, once finished, ``results.json`` (train) or ``summary.json`` (sweep, ensemble). Its
kind is read from the files present, not from the module that wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdl import report
from jaxdl.config import RECORD_KEYS, saved_flags
from jaxdl.validate import InputError

RUN_FILES = ("config.json", "results.json", "summary.json")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory, read. ``kind``: train, sweep, ensemble or unknown; ``results``:
    ``results.json`` of a train run, ``summary.json`` otherwise ({} while unfinished);
    ``rows``: a sweep's members (its ``results.json``); ``created``: epoch seconds."""

    path: Path
    kind: str
    config: dict[str, Any]
    results: dict[str, Any]
    rows: list[dict[str, Any]]
    created: float

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return bool(self.results)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e})") from None


def is_run(path: Path) -> bool:
    """True if ``path`` is a directory holding one of ``RUN_FILES``."""
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def load_run(path: str | Path) -> Run:
    """Reads one run directory; ``InputError`` if ``path`` is not one."""
    path = Path(path)
    if not is_run(path):
        raise InputError(
            f"{str(path)!r}: not a run directory (expected {', '.join(RUN_FILES)} in it)"
        )
    cfg = _read_json(path / "config.json") or {}
    results = _read_json(path / "results.json")
    summary = _read_json(path / "summary.json")
    rows: list[dict[str, Any]] = []
    if isinstance(summary, dict) and "members" in summary:
        kind, res = "sweep", summary
        rows = results if isinstance(results, list) else []
    elif isinstance(summary, dict) and (
        "weight_scaling_accuracy" in summary or "mc_accuracy" in summary
    ):
        kind, res = "ensemble", summary
    elif isinstance(results, dict):
        kind, res = "train", results
    else:
        kind = cfg.get("command", "unknown") if isinstance(cfg, dict) else "unknown"
        res = summary if isinstance(summary, dict) else {}
    stamp = path / "config.json" if (path / "config.json").exists() else path
    return Run(path, str(kind), cfg, res, rows, stamp.stat().st_mtime)


def expand(paths: Iterable[str | Path]) -> list[Run]:
    """Each path as a run, or, for a directory of runs (``runs/``), all of them newest first."""
    out: list[Run] = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(load_run(p))
        elif p.is_dir() and (found := find_runs(p)):
            out.extend(found)
        else:
            out.append(load_run(p))  # raises the not-a-run error
    return out


def find_runs(root: str | Path) -> list[Run]:
    """The run directories directly under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{str(root)!r}: no such directory of runs")
    runs = [load_run(p) for p in root.iterdir() if is_run(p)]
    return sorted(runs, key=lambda r: (r.created, r.name), reverse=True)


def describe_model(cfg: Mapping[str, Any]) -> str:
    """``mlp 500-500 relu`` from flag-named settings."""
    if cfg.get("model") == "cnn":
        widths = "-".join(map(str, cfg.get("conv_features") or ()))
        return f"cnn {widths} {cfg.get('activation', '')}".strip()
    if "hidden" in cfg:
        return f"mlp {'-'.join(map(str, cfg['hidden']))} {cfg.get('activation', '')}".strip()
    if ":" in str(cfg.get("model", "")):  # a module of the user's own: its class and arguments
        args = " ".join(f"{k}={v}" for k, v in (cfg.get("model_args") or {}).items()
                        if k != "num_classes")  # fmt: skip
        return f"{cfg['model'].rpartition(':')[2]} {args}".strip()
    return ""


def _lr(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} values" if len(value) > 1 else _lr(value[0] if value else None)
    return "default" if value is None else f"{value:g}"


def summary_row(run: Run) -> dict[str, Any]:
    """The key facts of a run, one table row: name, kind, when, model, results."""
    cfg, res = settings(run), run.results
    row: dict[str, Any] = {
        "run": run.name,
        "kind": run.kind,
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created)),
        "model": describe_model(cfg),
        "optimizer": f"{cfg['optimizer']} lr={_lr(cfg.get('lr'))}" if "optimizer" in cfg else "",
    }
    if run.kind == "train":
        row.update(
            epochs=res.get("epochs_run"),
            val_accuracy=res.get("val_accuracy"),
            test_accuracy=res.get("test_accuracy"),
        )
    elif run.kind == "sweep":
        best = res.get("best") or {}
        row.update(
            epochs=cfg.get("epochs"),
            val_accuracy=best.get("best_val_accuracy"),
            test_accuracy=best.get("test_accuracy"),
            members=res.get("members"),
        )
    elif run.kind == "ensemble":
        row.update(test_accuracy=res.get("weight_scaling_accuracy"))
    row["status"] = "finished" if run.finished else "unfinished"
    return row


COLUMNS = ("run", "kind", "created", "model", "optimizer", "epochs", "members",
           "val_accuracy", "test_accuracy", "status")  # fmt: skip


def run_table(runs: Sequence[Run]) -> str:
    """``jaxdl runs``: a plain-text table, one line per run in the given order."""
    rows = [summary_row(r) for r in runs]
    columns = [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    return report.format_table(rows, columns)


# Flags that only said how a run was shown while it ran: not settings worth comparing.
_SHOWN_ONLY = ("json", "no_progress", "no_plots")


def settings(run: Run) -> dict[str, Any]:
    """A run's settings by flag name (``jaxdl.config.saved_flags``) less the keys kept only
    for the record and the display flags, with a default learning rate (``lr`` null: the optimizer's own) shown
    as its value. An unreadable run config gives the file's keys as they are."""
    try:
        flat = saved_flags(run.config)
    except (InputError, TypeError, AttributeError):
        flat = dict(run.config)
    out = {k: v for k, v in flat.items() if k not in RECORD_KEYS and k not in _SHOWN_ONLY}
    resolved = (run.config.get("resolved") or {}).get("hyperparams") or {}
    if out.get("lr") is None and "learning_rate" in resolved:
        out["lr"] = resolved["learning_rate"]
    return out


def flat_results(run: Run) -> dict[str, Any]:
    """Scalar results, nested keys joined with dots (``best.test_accuracy``); no paths."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif not prefix.endswith(("run_dir", "results_path")):
            out[prefix] = value

    walk("", run.results)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def differences(
    runs: Sequence[Run], *, skip_missing: bool = False
) -> dict[str, dict[str, list[Any]]]:
    """``{"settings": {key: [value per run]}, "results": {...}}`` for the keys whose
    values are not all equal. A key missing from a run counts as ``None``; with
    ``skip_missing`` it is left out of the comparison (runs of different kinds)."""
    if len(runs) < 2:
        raise InputError(f"compare: expected at least 2 run directories, got {len(runs)}")
    out: dict[str, dict[str, list[Any]]] = {}
    for part, get in (("settings", settings), ("results", flat_results)):
        tables = [get(r) for r in runs]
        keys = list(dict.fromkeys(k for t in tables for k in t))
        diff = {k: [t.get(k) for t in tables] for k in keys}
        present = {
            k: [t[k] for t in tables if k in t] if skip_missing else v for k, v in diff.items()
        }
        out[part] = {
            k: v
            for k, v in diff.items()
            if not all(_same(present[k][0], x) for x in present[k][1:])
        }
    return out


def compare_text(runs: Sequence[Run], diff: Mapping[str, Mapping[str, list[Any]]]) -> str:
    """The differences as two aligned tables (one column per run)."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    blocks = []
    for part in ("settings", "results"):
        rows = [{part: k, **dict(zip(names, v, strict=True))} for k, v in diff[part].items()]
        if rows:
            rows = [{k: _text(v) for k, v in row.items()} for row in rows]
            blocks.append(report.format_table(rows, [part, *names]))
        else:
            blocks.append(f"{part}: all equal")
    return "\n\n".join(blocks)


def _text(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value
