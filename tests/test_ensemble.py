"""The ensemble view: exact enumeration, Monte-Carlo curves, mask sampling, explicit
ensembles, and ``jaxdl ensemble``, checked against hand-written loops and theory."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import cli, ensemble

X = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 3, size=37).astype(np.int32)


def _net(hidden, activation="relu", convention="inverted", seed=0):
    model = jaxdl.MLP(hidden=hidden, num_classes=3, activation=activation,
                      dropout_convention=convention)  # fmt: skip
    return model, model.init(jax.random.key(seed), X[:1])


@pytest.mark.parametrize(
    "hidden, rates",
    [((3,), [0.0, 0.3]), ((2, 1), [0.0, 0.3, 0.6]), ((3,), [0.5, 0.0])],
    ids=["last-layer-affine", "two-layers", "input"],
)
@pytest.mark.parametrize("convention", ["inverted", "classic"])
def test_exact_enumeration_equals_hand_loop(hidden, rates, convention, enumerate_subnetworks):
    model, variables = _net(hidden, convention=convention)
    got = ensemble.exact_probs(model, variables, rates, X, batch_size=16)
    probs, logp, logits = enumerate_subnetworks(model, variables, rates, X)
    np.testing.assert_allclose(got["arithmetic"], probs, atol=2e-6)
    np.testing.assert_allclose(got["geometric"], jax.nn.softmax(logp), atol=2e-6)
    np.testing.assert_allclose(got["mean_logits"], logits, atol=1e-5)


@pytest.mark.parametrize("convention", ["inverted", "classic"])
def test_linear_network_weight_scaling_is_the_exact_ensemble_mean(convention):
    model, variables = _net((3, 2), activation="linear", convention=convention)
    rates = [0.5, 0.4, 0.3]  # 4 + 3 + 2 = 9 masked units
    exact = ensemble.exact_probs(model, variables, rates, X)
    ws = ensemble.weight_scaling_logits(model, variables, rates, X)
    np.testing.assert_allclose(exact["mean_logits"], ws, atol=1e-5)
    # ... while the mean of the probabilities is not the softmax of the mean logits.
    assert np.abs(exact["arithmetic"] - jax.nn.softmax(ws)).max() > 1e-3


def test_single_masked_layer_before_softmax_geometric_mean_is_weight_scaling():
    # Logits are affine in the mask here, so the normalised geometric mean over all
    # subnetworks is exactly the softmax of the weight-scaled logits.
    model, variables = _net((6, 5))
    rates = [0.0, 0.0, 0.5]
    exact = ensemble.exact_probs(model, variables, rates, X)
    ws = ensemble.weight_scaling_logits(model, variables, rates, X)
    np.testing.assert_allclose(exact["geometric"], jax.nn.softmax(ws), atol=1e-6)


def test_nlls_agree_when_probabilities_underflow():
    # Huge logits: some true-class probabilities are 0 in float32. Every predictor's NLL
    # is still the real one, so the exact geometric mean (= weight scaling here) and the
    # Monte-Carlo geometric mean at large k agree with weight scaling's NLL.
    model, variables = _net((6, 5))
    variables = jax.tree_util.tree_map(lambda w: 40.0 * w, variables)
    rates = [0.0, 0.0, 0.5]
    res = ensemble.analyse(model, variables, rates, jaxdl.Dataset(X, Y), key=jax.random.key(0),
                           k=4000, repeats=1, ood_size=2)  # fmt: skip
    lp = jax.nn.log_softmax(ensemble.weight_scaling_logits(model, variables, rates, X))
    assert np.exp(np.asarray(lp))[np.arange(len(Y)), Y].min() == 0.0  # the case guarded
    ws = res["weight_scaling"]["nll"]
    assert ws == pytest.approx(-float(np.asarray(lp, np.float64)[np.arange(len(Y)), Y].mean()))
    assert res["exact"]["geometric"]["nll"] == pytest.approx(ws, rel=1e-4)
    assert res["geometric_nll"][0, -1] == pytest.approx(ws, rel=0.05)
    assert np.isfinite(res["exact"]["arithmetic"]["nll"])
    assert res["arithmetic_nll"][0, -1] == pytest.approx(
        res["exact"]["arithmetic"]["nll"], rel=0.05
    )


def test_exact_refuses_too_many_units_and_says_what_to_do():
    model, variables = _net((30,))
    with pytest.raises(jaxdl.InputError, match=r"at most 20 masked units.*34 units.*Monte-Carlo"):
        ensemble.exact_probs(model, variables, [0.5, 0.5], X)


def test_masks_same_key_same_masks_prefix_and_keep_rate():
    model, _ = _net((100,))
    key = jax.random.key(5)
    a = ensemble.sample_masks(key, model, [0.2, 0.5], 2000, (4,))
    b = ensemble.sample_masks(key, model, [0.2, 0.5], 50, (4,))
    assert [m.shape for m in a] == [(2000, 4), (2000, 100)]
    for ma, mb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ma[:50], mb)  # the first k of a K-sample
    hidden = np.asarray(a[1])
    assert len({row.tobytes() for row in hidden}) == 2000  # every subnetwork differs
    assert set(np.unique(hidden)) == {0.0, 1.0}
    # keep rates within 5 standard errors
    assert abs(hidden.mean() - 0.5) < 5 * np.sqrt(0.25 / hidden.size)
    assert abs(np.asarray(a[0]).mean() - 0.8) < 5 * np.sqrt(0.16 / a[0].size)
    c = ensemble.sample_masks(jax.random.key(6), model, [0.2, 0.5], 50, (4,))
    assert not np.array_equal(c[1], b[1])


def test_mc_curve_equals_brute_force_at_every_k():
    model, variables = _net((8, 6))
    rates = jnp.asarray([0.2, 0.5, 0.5])
    masks = ensemble.sample_masks(jax.random.key(1), model, rates, 23, (4,))
    # batch 16 and an odd K: padded example chunks and padded mask chunks must not count
    st = ensemble.mc_stats(model, variables, rates, X, Y, masks, batch_size=16)
    lp = np.asarray(
        jax.nn.log_softmax(ensemble.subnetwork_logits(model, variables, rates, X, masks)),
        np.float64,
    )
    for k in (1, 2, 7, 23):
        arith = ensemble.accuracy_nll(np.log(np.exp(lp[:k]).mean(0)), Y)
        geo = ensemble.accuracy_nll(jax.nn.log_softmax(lp[:k].mean(0)), Y)
        assert st["arithmetic_accuracy"][k - 1] == pytest.approx(arith["accuracy"], abs=1e-6)
        assert st["arithmetic_nll"][k - 1] == pytest.approx(arith["nll"], rel=1e-4)
        assert st["geometric_accuracy"][k - 1] == pytest.approx(geo["accuracy"], abs=1e-6)
        assert st["geometric_nll"][k - 1] == pytest.approx(geo["nll"], rel=1e-4)
    single = (lp.argmax(-1) == Y).mean(-1)
    np.testing.assert_allclose(st["single_accuracy"], single, atol=1e-6)
    pred = lp.argmax(-1)  # (K, N)
    pairs = [(i, j) for i in range(23) for j in range(23) if i != j]
    disagree = np.mean([pred[i] != pred[j] for i, j in pairs], axis=0)
    np.testing.assert_allclose(st["disagreement"], disagree, atol=1e-6)
    mean_p = np.exp(lp).mean(0)
    entropy = -(mean_p * np.log(mean_p)).sum(-1)
    np.testing.assert_allclose(st["entropy"], entropy, atol=1e-5)
    mi = entropy + (np.exp(lp) * lp).sum(-1).mean(0)
    np.testing.assert_allclose(st["mutual_information"], mi, atol=1e-5)


def test_mc_nll_stays_finite_when_a_probability_underflows():
    # Scaled-up weights make some true-class log-probabilities far below float32's range
    # (exp underflows to 0): the NLL must be the log-sum-exp value, not inf.
    model, variables = _net((8,))
    variables = jax.tree_util.tree_map(lambda w: 300.0 * w, variables)
    rates = jnp.asarray([0.0, 0.5])
    masks = ensemble.sample_masks(jax.random.key(3), model, rates, 5, (4,))
    st = ensemble.mc_stats(model, variables, rates, X, Y, masks)
    lp = np.asarray(
        jax.nn.log_softmax(ensemble.subnetwork_logits(model, variables, rates, X, masks)),
        np.float64,
    )
    assert np.exp(lp.astype(np.float32)).min() == 0.0  # the case this guards against
    want = -(np.logaddexp.reduce(lp, axis=0) - np.log(5))[np.arange(len(Y)), Y].mean()
    assert np.isfinite(st["arithmetic_nll"]).all()
    assert st["arithmetic_nll"][-1] == pytest.approx(want, rel=1e-4)


def test_cnn_exact_enumeration_with_the_conv_features_masked(enumerate_subnetworks):
    # Masked layer 0 of a CNN is the flattened conv output: the convolutions run once and
    # the masks go through the dense head only.
    model = jaxdl.CNN(features=(1,), kernel_size=3, dense=(2,), num_classes=3,
                      image_shape=(4, 4, 1))  # fmt: skip
    x = np.random.default_rng(2).normal(size=(5, 16)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    rates = [0.5, 0.3]  # 4 conv features + 2 hidden units
    got = ensemble.exact_probs(model, variables, rates, x)
    probs, _, logits = enumerate_subnetworks(model, variables, rates, x)
    np.testing.assert_allclose(got["arithmetic"], probs, atol=2e-6)
    np.testing.assert_allclose(got["mean_logits"], logits, atol=1e-5)


def test_mc_converges_to_the_exact_ensemble():
    model, variables = _net((4,))
    rates = [0.0, 0.5]
    exact = ensemble.exact_probs(model, variables, rates, X)
    masks = ensemble.sample_masks(jax.random.key(2), model, rates, 20000, (4,))
    st = ensemble.mc_stats(model, variables, rates, X, Y, masks)
    assert np.abs(st["probs"] - exact["arithmetic"]).max() < 0.01


def test_without_dropout_every_subnetwork_is_the_network():
    model, variables = _net((8,))
    masks = ensemble.sample_masks(jax.random.key(0), model, [0.0, 0.0], 10, (4,))
    st = ensemble.mc_stats(model, variables, [0.0, 0.0], X, Y, masks)
    ws = ensemble.accuracy_nll(
        jax.nn.log_softmax(ensemble.weight_scaling_logits(model, variables, [0.0, 0.0], X)), Y
    )
    np.testing.assert_allclose(st["arithmetic_accuracy"], ws["accuracy"], atol=1e-6)
    np.testing.assert_allclose(st["arithmetic_nll"], ws["nll"], rtol=1e-5)
    np.testing.assert_allclose(st["disagreement"], 0.0)
    np.testing.assert_allclose(st["mutual_information"], 0.0, atol=1e-5)


def test_programs_compile_once_for_new_masks_and_weights():
    model, variables = _net((5,))
    before_mc, before_exact = ensemble.traces["mc"], ensemble.traces["exact"]
    for seed in range(3):
        v = model.init(jax.random.key(seed), X[:1])
        masks = ensemble.sample_masks(jax.random.key(seed), model, [0.1, 0.5], 30, (4,))
        ensemble.mc_stats(model, v, [0.1, 0.5], X, Y, masks)
        ensemble.exact_probs(model, v, [0.0, 0.5 + 0.1 * seed], X)
    assert ensemble.traces["mc"] - before_mc == 1
    assert ensemble.traces["exact"] - before_exact == 1


def test_bad_masks_and_rates_are_refused():
    model, variables = _net((5,))
    with pytest.raises(jaxdl.InputError, match="widths"):
        ensemble.mc_stats(model, variables, [0.1, 0.5], X, Y, (jnp.ones((3, 4)), jnp.ones((3, 6))))
    with pytest.raises(jaxdl.InputError, match="dropout rates"):
        ensemble.sample_masks(jax.random.key(0), model, [0.1, 1.5], 3, (4,))
    with pytest.raises(jaxdl.InputError, match="k"):
        ensemble.sample_masks(jax.random.key(0), model, [0.1, 0.5], 0, (4,))


def test_ood_inputs_and_trained_net_is_less_sure_off_distribution(blobs):
    model = jaxdl.MLP(hidden=(64,), num_classes=3)
    state, _ = jaxdl.fit(model, jaxdl.make_optimizer("adam"), blobs.train, epochs=5,
                         batch_size=32, dropout=[0.0, 0.5])  # fmt: skip
    variables = ensemble.variables_of(state)
    masks = ensemble.sample_masks(jax.random.key(0), model, [0.0, 0.5], 50, (20,))
    test = ensemble.mc_stats(model, variables, [0.0, 0.5], blobs.test.x, blobs.test.y, masks)
    ood = ensemble.ood_inputs(blobs.test.x, image_shape=(28, 28))
    assert set(ood) == {"noise"}  # 20 features are not an image: no rotation
    noise = ensemble.mc_stats(model, variables, [0.0, 0.5], ood["noise"],
                              np.zeros(128, np.int32), masks)  # fmt: skip
    assert test["arithmetic_accuracy"][-1] > 0.95
    assert noise["entropy"].mean() > 2 * test["entropy"].mean()
    images = np.random.default_rng(0).random((3, 784)).astype(np.float32)
    rotated = ensemble.ood_inputs(images)["rotated"].reshape(3, 28, 28)
    np.testing.assert_array_equal(rotated[1], np.rot90(images[1].reshape(28, 28)))


def test_fixed_mask_members_train_and_are_evaluated_as_their_subnetwork(blobs):
    model = jaxdl.MLP(hidden=(16,), num_classes=3)
    config = jaxdl.RunConfig.of(model, jaxdl.make_optimizer("adam"), epochs=2, batch_size=64)
    out = ensemble.train_explicit(
        config, blobs.train, n=3, rates=[0.5, 0.5], key=jax.random.key(3), test=blobs.test
    )
    masks, bag, ind = out["masks"], out["bagging"], out["independent"]
    init = jax.vmap(lambda k: model.init(k, blobs.train.x[:1]))(
        jnp.stack([jax.random.split(jaxdl.train.as_key(s))[0] for s in range(3)])
    )
    dropped = np.asarray(masks[0]) == 0  # (3, 20) input features member m never sees
    w_now, w_init = (
        np.asarray(bag.states.params["layer_0"]["kernel"]),
        np.asarray(init["params"]["layer_0"]["kernel"]),
    )
    moved = np.abs(w_now - w_init).max(-1) > 0  # (3, 20) kernel rows that were updated
    assert dropped.any() and (~dropped).any()
    np.testing.assert_array_equal(moved, ~dropped)
    for res, m in ((bag, masks), (ind, None)):
        st = ensemble.member_stats(model, res.states, blobs.test.x, blobs.test.y, masks=m)
        np.testing.assert_allclose(st["single_accuracy"], [r["test_accuracy"] for r in res.rows],
                                   atol=1e-6)  # fmt: skip
        assert st["accuracy"][0] == pytest.approx(st["single_accuracy"][0])
    with pytest.raises(jaxdl.InputError, match=r"masks\[1\]"):
        jaxdl.sweep.sweep(model, jaxdl.make_optimizer("adam"), blobs.train, [{}], seeds=2,
                          epochs=1, masks=(masks[0][:2], jnp.ones((2, 5))))  # fmt: skip


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    s = jaxdl.synthetic_splits(300, 60, 80, num_features=784, num_classes=4, seed=2, separation=8.0)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    jaxdl.data.save_file(path, s)
    return path


def test_cli_ensemble_writes_summary_plots_and_json(tmp_path, small_npz, capsys):
    argv = ["ensemble", "--data", str(small_npz), "--hidden", "32,12", "--dropout-input", "0",
            "--epochs", "2", "--batch-size", "50", "--k", "20", "--repeats", "2", "--explicit", "2",
            "--runs-dir", str(tmp_path), "--name", "e", "--json", "--no-progress"]  # fmt: skip
    code = cli.main(argv)  # dropout: 0.5 on the hidden layers by default
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out.strip().splitlines()[-1])
    # 32 + 12 = 44 masked hidden units: too many to enumerate, so no exact accuracy
    assert "exact_accuracy" not in res
    assert set(res["mc_accuracy"]) == {"1", "2", "5", "10", "20"}
    for key in ("weight_scaling_accuracy", "geometric_accuracy", "run_dir"):
        assert key in res
    assert set(res["independent_accuracy"]) == {"1", "2"}
    line = out.out.strip().splitlines()[-2]  # the summary names the explicit ensembles too
    for name in ("independent", "bagging"):
        assert f"; {name} ensemble of 2: {res[f'{name}_accuracy']['2']:.4f}" in line
    run = Path(res["run_dir"])
    assert run == tmp_path / "e"
    for f in ("config.json", "summary.json", "ensemble.json", "history.json", "k_curve.png",
              "subnetworks.png"):  # fmt: skip
        assert (run / f).stat().st_size > 0, f
    saved = json.loads((run / "ensemble.json").read_text())
    assert np.shape(saved["arithmetic_accuracy"]) == (2, 20)
    assert json.loads((run / "summary.json").read_text()) == res


def test_cli_ensemble_enumerates_a_small_layer(tmp_path, small_npz, capsys):
    code = cli.main(["ensemble", "--data", str(small_npz), "--hidden", "64,10", "--dropout-input",
                     "0", "--dropout-hidden", "0.5", "--epochs", "2", "--batch-size", "50", "--k",
                     "10", "--repeats", "1", "--runs-dir", str(tmp_path), "--json",
                     "--no-progress", "--no-plots"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    # 64 + 10 hidden units are masked: --exact auto skips; the same flags on 10 only:
    res = json.loads(out.out.strip().splitlines()[-1])
    assert "exact_accuracy" not in res
    code = cli.main(["ensemble", "--data", str(small_npz), "--hidden", "10", "--dropout-input",
                     "0", "--dropout-hidden", "0.5", "--epochs", "2", "--batch-size", "50", "--k",
                     "10", "--repeats", "1", "--runs-dir", str(tmp_path), "--json",
                     "--no-progress", "--no-plots"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["exact_units"] == 10 and 0.0 <= res["exact_accuracy"] <= 1.0


def _train_run(tmp_path, small_npz, name, *flags):
    argv = ["train", "--data", str(small_npz), "--hidden", "10", "--dropout-input", "0",
            "--dropout-hidden", "0.5", "--epochs", "3", "--batch-size", "50", "--runs-dir",
            str(tmp_path), "--name", name, "--no-progress", "--no-plots", "--json", *flags]  # fmt: skip
    assert cli.main(argv) == 0
    return tmp_path / name


def test_cli_ensemble_from_a_finished_train_run(tmp_path, small_npz, capsys):
    run = _train_run(tmp_path, small_npz, "t", "--lr", "3e-3")
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    code = cli.main(["ensemble", "--from", str(run), "--data-dir", str(tmp_path), "--k", "10",
                     "--repeats", "1", "--runs-dir", str(tmp_path), "--name", "e", "--json",
                     "--no-progress", "--no-plots"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out.strip().splitlines()[-1])
    # the very net the run trained: its deterministic pass is the run's test accuracy
    assert res["weight_scaling_accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-6)
    assert res["exact_units"] == 10  # the run's own dropout: 0.5 on its 10 hidden units
    assert not (tmp_path / "e" / "history.json").exists()  # nothing was trained
    saved = json.loads((tmp_path / "e" / "config.json").read_text())
    assert saved["options"]["from_run"] == str(run)


def test_cli_ensemble_from_refuses_what_it_cannot_load(tmp_path, small_npz, capsys):
    run = _train_run(tmp_path, small_npz, "t")
    plain = _train_run(tmp_path, small_npz, "plain", "--dropout-hidden", "0")
    bare = _train_run(tmp_path, small_npz, "bare", "--checkpoint-every", "0")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text((run / "config.json").read_text())
    capsys.readouterr()
    cases = [
        ([str(run), "--lr", "0.1"], "--lr: with --from the net and its settings are those of"),
        ([str(tmp_path / "missing")], "expected a run directory with a config.json"),
        ([str(tmp_path / "unfinished")], "has not finished (no results.json)"),
        ([str(plain)], "--from: the ensemble view needs dropout"),
        ([str(bare)], "kept no checkpoint"),
    ]
    for flags, message in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        code = cli.main(["ensemble", "--from", *flags, "--runs-dir", str(tmp_path),
                         "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, (flags, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--k", "0"], "--k"),
        (["--repeats", "-1"], "--repeats"),
        (["--dropout-input", "0", "--dropout-hidden", "0"], "needs dropout"),
        (["--exact", "on"], "--max-units"),
        (["--explicit", "-2"], "--explicit"),
        (["--tensorboard"], "--tensorboard"),
    ],
)
def test_cli_ensemble_bad_flags_exit_2_with_one_line(tmp_path, small_npz, capsys, flags, message):
    code = cli.main(["ensemble", "--data", str(small_npz), "--hidden", "32", "--runs-dir",
                     str(tmp_path), "--no-progress", *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.e2e
def test_mnist_mc_average_approaches_weight_scaling():
    splits = jaxdl.load("mnist")
    model = jaxdl.MLP(hidden=(256, 256))
    train = jaxdl.data.subset(splits.train, 10000)
    state, _ = jaxdl.fit(model, jaxdl.make_optimizer("adam"), train, epochs=3, batch_size=100,
                         dropout=[0.2, 0.5, 0.5])  # fmt: skip
    test = jaxdl.data.subset(splits.test, 2000)
    res = ensemble.analyse(model, ensemble.variables_of(state), [0.2, 0.5, 0.5], test,
                           key=jax.random.key(0), k=50, repeats=2, ood_size=500)  # fmt: skip
    ws = res["weight_scaling"]["accuracy"]
    mc = res["arithmetic_accuracy"].mean(0)
    assert ws > 0.88
    assert mc[0] < mc[-1]  # more subnetworks, better ensemble
    assert abs(mc[-1] - ws) < 0.01  # at k=50 the MC average is as good as weight scaling
    assert np.mean(res["single_accuracy"]) < mc[-1]
    for name in ("noise", "rotated"):  # less sure off the training distribution
        assert res["entropy"][name].mean() > 1.5 * res["entropy"]["test"].mean()
