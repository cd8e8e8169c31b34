"""``jaxdl runs | compare | report`` (run directories read back) and ``jaxdl data fetch``."""

from __future__ import annotations

import argparse
import time

from jaxdl import (
    data,
    runs,
    validate,
)
from jaxdl.report import html as html_report
from jaxdl.validate import InputError


def cmd_fetch(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    path = data.fetch_mnist(a.data_dir, force=a.force)
    return {"dataset": a.name, "path": str(path), "seconds": time.perf_counter() - t0}


def cmd_runs(a: argparse.Namespace) -> tuple[dict, str]:
    validate.positive_int("--limit", a.limit, allow_zero=True)
    found = runs.find_runs(a.runs_dir)[: a.limit or None]
    table = runs.run_table(found) if found else f"no runs in {a.runs_dir}"
    return {"runs": [runs.summary_row(r) for r in found], "runs_dir": str(a.runs_dir)}, table


def cmd_compare(a: argparse.Namespace) -> tuple[dict, str]:
    found = [runs.load_run(p) for p in a.paths]
    diff = runs.differences(found)
    return {"runs": [str(r.path) for r in found], **diff}, runs.compare_text(found, diff)


def cmd_report(a: argparse.Namespace) -> tuple[dict, str]:
    if a.out.is_dir():
        raise InputError(f"--out: {str(a.out)!r} is a directory; expected an HTML file name")
    if a.out.exists() and not a.force:
        raise InputError(f"--out: {str(a.out)!r} exists; give --force to overwrite it, "
                         "or another --out")  # fmt: skip
    res = html_report.write(a.paths, a.out, title=a.title)
    return res, f"report {res['report']}: {res['runs']} run(s), {res['plots']} plot(s)"


_VIEWS = {"runs": cmd_runs, "compare": cmd_compare, "report": cmd_report}
