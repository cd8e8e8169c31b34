"""The host's cores as devices: set before JAX starts, kept by later calls, refused when
JAX has already started with another count. Fresh interpreters, since JAX fixes its
device count when it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxdl
from jaxdl import devices

FRESH = """
import os, jax, jaxdl
assert jaxdl.use_cpu_cores() == len(os.sched_getaffinity(0)) == len(jax.devices())
jax.numpy.zeros(1).block_until_ready()  # JAX has started
assert jaxdl.use_cpu_cores(len(jax.devices())) == len(jax.devices())  # same count: fine
try:
    jaxdl.use_cpu_cores(len(jax.devices()) + 1)
except jaxdl.InputError as e:
    assert "already started with" in str(e), e
else:
    raise AssertionError("a new count after JAX started was accepted")
print("OK")
"""

SET = """
import jax, jaxdl
assert jaxdl.use_cpu_cores(3) == 3 and len(jax.devices()) == 3
print("OK")
"""

ENV = """
import jax, jaxdl
assert jaxdl.use_cpu_cores() == 4 and len(jax.devices()) == 4  # the environment's count
print("OK")
"""


def _python(
    code: str, env: dict[str, str] | None = None, *args: str
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return subprocess.run(
        [sys.executable, *(("-c", code) if code else ()), *args],
        capture_output=True, text=True, timeout=300, env={**environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    "code, env",
    [
        (FRESH, None),
        (SET, None),
        (ENV, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
    ],
    ids=["one-per-core", "explicit", "environment-kept"],
)
def test_use_cpu_cores_before_jax_starts(code, env):
    out = _python(code, env)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_use_cpu_cores_after_jax_started_in_this_process():
    have = len(jax.devices("cpu"))  # conftest started JAX
    assert jaxdl.use_cpu_cores(have) == have
    with pytest.raises(
        jaxdl.InputError, match=f"cannot use {have + 2} CPU devices.*started with {have}"
    ):
        jaxdl.use_cpu_cores(have + 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(jaxdl.InputError, match="CPU devices: expected an integer > 0"):
            jaxdl.use_cpu_cores(bad)


def test_a_sweep_uses_no_more_devices_than_members():
    fake = ["d0", "d1", "d2"]
    assert devices.for_members(2, fake) == ["d0", "d1"]
    assert devices.for_members(7, fake) == fake
    assert devices.for_members(0, fake) == ["d0"]
    assert devices.for_members(4) == jax.devices()[:4]
    with pytest.raises(jaxdl.InputError, match="devices: expected at least one device"):
        devices.for_members(3, [])


def test_cli_sweep_runs_its_members_on_the_cores(tmp_path):
    """``jaxdl sweep --cpu-devices 2`` in its own process: the members are sharded over
    two CPU devices, and the run says so."""
    s = jaxdl.synthetic_splits(200, 60, 60, num_features=784, num_classes=4, seed=2, separation=8.0)
    data = jaxdl.data.save_file(tmp_path / "tiny.npz", s)
    out = _python(
        "", None, "-m", "jaxdl.cli", "sweep", "--data", str(data), "--hidden", "8", "--epochs", "1",
        "--batch-size", "50", "--lr", "0.01,0.1,0.3", "--cpu-devices", "2", "--runs-dir",
        str(tmp_path), "--name", "s", "--json", "--no-progress", "--no-plots",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 2 and res["members"] == 3 and res["compiles"] == 1
    assert json.loads((tmp_path / "s" / "config.json").read_text())["options"]["cpu_devices"] == 2


@pytest.fixture
def fresh_options(monkeypatch):
    """``compiler_options`` recomputed under the test's patches, and again after it."""
    devices.compiler_options.cache_clear()
    yield
    monkeypatch.undo()
    devices.compiler_options.cache_clear()


@pytest.mark.parametrize(
    ("flags", "xla_flags", "expected"),
    [
        ({"avx2", "avx512f"}, "", {"xla_cpu_prefer_vector_width": 512}),
        ({"avx2", "fma"}, "", {}),  # no 512-bit registers: XLA's default
        (set(), "", {}),  # flags unknown (not Linux)
        ({"avx512f"}, "--xla_cpu_prefer_vector_width=256", {}),  # the user's value wins
    ],
)
def test_compiler_options_ask_for_512_bit_loops_only_where_the_cpu_has_them(
    monkeypatch, fresh_options, flags, xla_flags, expected
):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    assert devices.compiler_options() == expected


def test_compiler_options_fall_back_when_xla_does_not_know_the_option(monkeypatch, fresh_options):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512f"})
    monkeypatch.setattr(devices, "_VECTOR_WIDTH", "xla_cpu_no_such_option")
    assert devices.compiler_options() == {}


def test_cpu_flags_are_read_from_the_host():
    flags = devices._cpu_flags()
    assert isinstance(flags, set)
    if os.path.exists("/proc/cpuinfo") and os.uname().machine == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it
        assert devices.cpu_info("model name")  # every x86-64 Linux names its CPU


def test_cpu_info_reads_fields_by_exact_name(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nmodel\t\t: 7\n"
                    "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: Other\n")  # fmt: skip
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert devices.cpu_info("model name") == "Some CPU 9000"  # the first CPU's
    assert devices.cpu_info("model") == "7"  # not the "model name" line
    assert devices.cpu_info("no such field") is None
    assert devices._cpu_flags() == {"fpu", "avx2", "avx512f"}


def _epoch_after(programs, setup, ds, hp):
    state = programs.init(jax.random.key(0), hp)
    state, _ = programs.epoch(state, jaxdl.train.to_device(ds), None, hp)
    return jax.device_get(state.params)


def test_programs_are_compiled_with_the_options_and_train_the_same(
    monkeypatch, fresh_options, blobs
):
    """The single-run and sweep epochs carry ``compiler_options`` (an option XLA does not
    know fails their compile, so it reached them), and the 512-bit code trains the same
    parameters as XLA's default."""
    from jaxdl import compiled, member_programs, sweep, train

    model = jaxdl.MLP(hidden=(48, 32), num_classes=3)
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=3, batch_size=64), blobs.train)
    by_option = {}
    for name, options in (("default", {}), ("wide", {"xla_cpu_prefer_vector_width": 512})):
        monkeypatch.setattr(devices, "compiler_options", lambda o=options: o)
        by_option[name] = _epoch_after(
            compiled._programs.__wrapped__(setup), setup, blobs.train, hp
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        by_option["default"], by_option["wide"],
    )  # fmt: skip

    monkeypatch.setattr(devices, "compiler_options", lambda: {"xla_cpu_no_such_option": 1})
    monkeypatch.setattr(member_programs, "compiler_options", devices.compiler_options)
    with pytest.raises(RuntimeError, match="xla_cpu_no_such_option"):
        _epoch_after(compiled._programs.__wrapped__(setup), setup, blobs.train, hp)
    ssetup, shp, keys, _ = sweep.prepare_sweep(
        jaxdl.RunConfig.of(model, opt, epochs=1, batch_size=64),
        blobs.train,
        [{"learning_rate": 0.01}],
    )
    progs = member_programs._programs.__wrapped__(ssetup, None, "own")
    states = progs.init(keys, shp)
    active = jax.numpy.ones((1,), bool)
    with pytest.raises(RuntimeError, match="xla_cpu_no_such_option"):
        progs.epoch(states, active, jaxdl.train.to_device(blobs.train), None, shp)
