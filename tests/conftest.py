"""Shared fixtures: small synthetic data sets, so the suite stays fast on 2 cores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# One XLA compilation cache for the run, made before JAX starts and inherited by the
# worker processes, subprocesses and notebook kernels: they compile many of the same
# programs, and compiling is most of the suite's time on 2 cores. New for each run, so
# no entry outlives the code that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxdl-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _cache, True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jaxdl  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

# Start JAX now, with its default device count, so that no in-process `jaxdl sweep`
# (whose --cpu-devices auto splits the cores before JAX starts) changes it for the
# tests after it. Tests of several devices run in fresh interpreters.
jax.devices()


@pytest.fixture(scope="session")
def blobs() -> jaxdl.Splits:
    """3 well-separated classes in 20 dimensions: 512 / 128 / 128 examples."""
    return jaxdl.synthetic_splits(
        512, 128, 128, num_features=20, num_classes=3, seed=0, separation=6.0
    )


@pytest.fixture(scope="session")
def random_images() -> jaxdl.Dataset:
    """100 images of 784 uniform pixels with random labels: only memorisation fits them."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(100, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=100).astype(np.int32)
    return jaxdl.Dataset(x, y)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A directory of finished runs made by the CLI on a tiny 784-feature data set: ``t``
    (train, TensorBoard on, plots), ``p`` (train, no plots), ``s`` (a 2×2 sweep,
    TensorBoard on). Returns ``(runs_root, data_path)``."""
    from jaxdl import cli

    s = jaxdl.synthetic_splits(200, 60, 60, num_features=784, num_classes=4, seed=2, separation=8.0)
    data_path = tmp_path_factory.mktemp("data") / "tiny.npz"
    jaxdl.data.save_file(data_path, s)
    root = tmp_path_factory.mktemp("runs")
    common = ["--data", str(data_path), "--batch-size", "50", "--runs-dir", str(root), "--no-progress"]  # fmt: skip
    for argv in (
        ["train", *common, "--hidden", "32,16", "--epochs", "3", "--name", "t", "--tensorboard"],
        ["train", *common, "--hidden", "8", "--epochs", "2", "--name", "p", "--no-plots", "--lr", "0.01"],
        ["sweep", *common, "--hidden", "16", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.01,0.1",
         "--seeds", "2", "--name", "s", "--tensorboard"],
    ):  # fmt: skip
        assert cli.main(argv) == 0, argv
    return root, data_path


@pytest.fixture
def fit_on_and_off(blobs):
    """``check(model, choice, rtol, atol)``: trains ``model`` with Adam on ``blobs`` with
    the CPU kernel ``choice`` (a ``Lowering`` field: ``gemm``, ``adam``, ``masks``) on and
    off, the rest of ``prepare(kernels="on")``'s lowering alike; asserts that the
    parameters agree within tolerance, and that a second ``fit`` with new numbers does not
    retrace the program."""
    import dataclasses

    from jaxdl import compiled, train

    def check(model, choice: str, rtol: float, atol: float) -> None:
        assert choice in ("gemm", "adam", "masks"), choice
        opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
        setup, hp = train.prepare(
            jaxdl.RunConfig.of(model, opt, epochs=2, batch_size=50, kernels="on"), blobs.train
        )
        assert getattr(setup.lowering, choice), f"prepare(kernels='on') left {choice} off"
        ends = {}
        for use in (True, False):
            lowered = dataclasses.replace(setup.lowering, **{choice: use})
            s = dataclasses.replace(setup, lowering=lowered)
            state = compiled.programs(s).init(train.as_key(0), hp)
            ends[use], _ = train.fit_state(s, state, hp, blobs.train)
        for a, b in zip(*(jax.tree.leaves(ends[k].params) for k in (True, False)), strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
        traces = dict(compiled.programs(setup).traces)
        assert traces.get("epoch"), traces  # the program the fits above ran
        jaxdl.fit(model, jaxdl.make_optimizer("adam", learning_rate=3e-3, b2=0.99), blobs.train,
                  epochs=2, batch_size=50, key=1, kernels="on")  # fmt: skip
        assert dict(compiled.programs(setup).traces) == traces

    return check


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv)``: runs ``jaxdl`` in this process (arguments as text); returns
    (exit code, stdout, stderr)."""
    from jaxdl import cli

    def run(*argv) -> tuple[int, str, str]:
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _enumerate_subnetworks(model, variables, rates, x):
    """Every subnetwork of ``model`` by a Python loop over explicit masks (all units of
    layers with a rate above 0): the P(m)-weighted mean probabilities, log-probabilities
    and logits, float64."""
    import itertools

    import jax
    import jax.numpy as jnp

    from jaxdl import contract

    widths = jaxdl.masked_widths(model, x.shape[1:])
    layers = [i for i, r in enumerate(rates) if r > 0]
    units = [(i, j) for i in layers for j in range(widths[i])]
    probs = logp = logits = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=len(units)):
        masks = [np.ones(w, np.float32) for w in widths]
        weight = 1.0
        for (i, j), b in zip(units, bits, strict=True):
            masks[i][j] = b
            weight *= (1 - rates[i]) if b else rates[i]
        out = contract.call(model, variables, x, rates=jnp.asarray(rates, jnp.float32),
                            masks=tuple(map(jnp.asarray, masks)))  # fmt: skip
        lp = np.asarray(jax.nn.log_softmax(out), np.float64)
        probs, logp = probs + weight * np.exp(lp), logp + weight * lp
        logits = logits + weight * np.asarray(out, np.float64)
    return probs, logp, logits


@pytest.fixture
def enumerate_subnetworks():
    """``enumerate_subnetworks(model, variables, rates, x)``: the dropout ensemble by
    brute force, (probs, log-probs, logits) weighted by each mask's probability."""
    return _enumerate_subnetworks
