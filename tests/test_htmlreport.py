"""``jaxdl report``: one self-contained HTML page, checked as text and rendered in headless
Chromium (screenshot, no console errors, every plot decoded and visible, tables sort)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image as mpimg

from jaxdl import cli, report, runs
from jaxdl.report import html as htmlreport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENSEMBLE = {
    "weight_scaling_accuracy": 0.91,
    "mc_accuracy": {"1": 0.8, "10": 0.88, "100": 0.9},
    "geometric_accuracy": 0.905,
    "exact_accuracy": 0.9075,
}


@pytest.fixture(scope="module")
def report_runs(tiny_runs, tmp_path_factory):
    """The tiny runs plus two ensemble runs: one with its k_curve.png, one without."""
    root, _ = tiny_runs
    extra = tmp_path_factory.mktemp("ensembles")
    for name, with_png in (("ensemble-png", True), ("ensemble-json", False)):
        d = extra / name
        report.write_json(d / "config.json", {"command": "ensemble", "k": [1, 10, 100]})
        report.write_json(d / "summary.json", {**ENSEMBLE, "run_dir": str(d)})
        report.write_json(d / "k_curve.json", ENSEMBLE["mc_accuracy"])
        if with_png:
            (d / "k_curve.png").write_bytes(htmlreport.k_curve_png(ENSEMBLE))
    paths = [root / "t", root / "p", root / "s", extra / "ensemble-png", extra / "ensemble-json"]
    return paths


@pytest.fixture(scope="module")
def page(report_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    argv = ["report", *map(str, report_runs), "--out", str(out), "--json", "--title", "Tiny runs"]
    assert cli.main(argv) == 0
    return out


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def test_page_is_self_contained_with_every_plot(page, report_runs, capsys):
    text = page.read_text(encoding="utf-8")
    images = _images(text)
    # t: curves + layers; p (--no-plots): both drawn from history.json; s: sweep + curves;
    # one ensemble's own k_curve.png; the other's drawn from its summary.
    assert len(images) == text.count("<img ") == 8
    assert all(img.startswith(PNG_MAGIC) for img in images)
    assert (report_runs[3] / "k_curve.png").read_bytes() in images
    assert (report_runs[0] / "curves.png").read_bytes() in images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched
    assert "<title>Tiny runs</title>" in text
    for name in ("t", "p", "s", "ensemble-png", "ensemble-json"):
        assert f"<h2>{name} <small>" in text
    assert "Settings that differ" in text and "Sweep members (4)" in text
    assert "Monte Carlo, k=100" in text and "exact (all subnetworks)" in text


def test_tables_carry_exact_values(page, report_runs):
    text = page.read_text(encoding="utf-8")
    t = json.loads((report_runs[0] / "results.json").read_text())
    assert f'data-value="{t["test_accuracy"]!r}"' in text
    assert t["params_digest"] in text
    members = text.split('class="sortable members"')[1].split("</table>")[0]
    assert members.count("<tr>") == 5  # header + 4 members
    for row in json.loads((report_runs[2] / "results.json").read_text()):
        assert f'data-value="{row["test_accuracy"]!r}"' in members


def test_a_directory_of_runs_expands_newest_first(tiny_runs, tmp_path):
    root, _ = tiny_runs
    res = htmlreport.write([root], tmp_path / "all.html")
    assert res["runs"] == len(runs.find_runs(root)) >= 3 and res["plots"] >= 6


def test_k_curve_from_the_summary():
    png = htmlreport.k_curve_png(ENSEMBLE)
    assert png.startswith(PNG_MAGIC)
    assert htmlreport.k_curve_png({"weight_scaling_accuracy": 0.9}) is None


def test_report_of_a_missing_run_exits_2(tmp_path, capsys):
    code = cli.main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "not a run directory" in err and not (tmp_path / "r.html").exists()


# --- in a browser ---------------------------------------------------------------------

_HARNESS = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const imgs = [...document.images];
  const visible = imgs.filter(i => { const r = i.getBoundingClientRect();
    return r.width > 100 && r.height > 100 && getComputedStyle(i).visibility !== "hidden"; });
  document.documentElement.dataset.visible = visible.length;
  const table = document.querySelector("table.members");
  if (table) {
    const th = [...table.tHead.rows[0].cells].find(c => c.textContent === "test_accuracy");
    const col = [...th.parentNode.children].indexOf(th);
    const read = () => [...table.tBodies[0].rows].map(r => +r.children[col].dataset.value);
    th.click(); const up = read(); th.click(); const down = read();
    document.documentElement.dataset.sorted = JSON.stringify({up, down});
  }
}, 50));
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip(
        "headless Chromium is not installed: .ci/run installs the Debian package 'chromium' "
        "with apt-get where it can"
    )


def _browse(html_path, tmp_path, *flags) -> tuple[str, str]:
    """Opens ``html_path`` in headless Chromium; returns (stdout, stderr)."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *flags,
           html_path.resolve().as_uri()]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stderr


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<html[^>]*>", dom).group(0)
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag))


def test_report_renders_in_headless_chromium(page, report_runs, tmp_path):
    shot = tmp_path / "report.png"
    _, err = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400",
                     "--hide-scrollbars")  # fmt: skip
    assert _console(err) == []
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank page
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _HARNESS + "</body>"))
    dom, err = _browse(probe, tmp_path, "--dump-dom")
    assert _console(err) == []
    attrs = _attrs(dom)
    assert attrs["plots"] == attrs["plots-loaded"] == attrs["visible"] == "8", attrs
    warning = "This plot failed to load"
    assert dom.count(warning) == probe.read_text().count(warning)  # only the script's own text
    sorted_ = json.loads(attrs["sorted"].replace("&quot;", '"'))
    values = [r["test_accuracy"] for r in json.loads((report_runs[2] / "results.json").read_text())]
    assert sorted_["up"] == pytest.approx(sorted(values))
    assert sorted_["down"] == pytest.approx(sorted(values, reverse=True))


def test_the_browser_check_catches_broken_plots_and_errors(tmp_path):
    """The checks above can fail: a page with a broken plot and a script error."""
    good = htmlreport.table([{"a": 1}], ["a"])
    page = tmp_path / "broken.html"
    page.write_text(
        htmlreport.render([]).replace(
            "</body>",
            f'{good}<img src="data:image/png;base64,AAAA"><script>noSuchFunction()</script>'
            f"{_HARNESS}</body>",
        )
    )
    dom, err = _browse(page, tmp_path, "--dump-dom")
    assert any("noSuchFunction" in line for line in _console(err))
    attrs = _attrs(dom)
    assert (attrs["plots"], attrs["plots-loaded"], attrs["visible"]) == ("1", "0", "0")
    warning = "This plot failed to load"
    assert dom.count(warning) == page.read_text().count(warning) + 1


def test_numbers_are_shown_readably_and_kept_exact_for_sorting():
    row = {"rate": 17808.906, "acc": 0.98539996, "loss": 0.0682, "n": 20, "big": 1e20}
    cells = htmlreport.table([row], list(row))
    shown = re.findall(r'data-value="([^"]+)">([^<]*)</td>', cells)
    assert shown == [
        ("17808.906", "17,809"),
        ("0.98539996", "0.9854"),
        ("0.0682", "0.0682"),
        ("20", "20"),
        ("1e+20", "1e+20"),
    ]
