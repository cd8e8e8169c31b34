"""RunConfig: one value that Python keywords, CLI flags and config.json all build."""

import json

import jax
import numpy as np
import pytest

import jaxdl
from jaxdl import cli, compiled, train
from jaxdl.config import (
    Checkpointing,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    Regularisation,
    RunConfig,
    Training,
    saved_flags,
)

ES = jaxdl.EarlyStopping("val_accuracy", 3, 0.001, False)


def _config() -> RunConfig:
    return RunConfig.of(
        jaxdl.MLP(hidden=(32, 16), num_classes=3, activation="tanh"),
        jaxdl.make_optimizer("momentum", learning_rate=0.05, momentum=0.8, schedule="step"),
        epochs=4, batch_size=50, early_stopping=ES, l2=1e-4, dropout=0.3, dropout_input=0.1,
        weight_decay=1e-5, checkpoint_every=2, kernels="off",
    )  # fmt: skip


def test_keywords_go_to_their_sections():
    c = _config()
    assert c.model == ModelConfig(
        "mlp",
        {"hidden": (32, 16), "num_classes": 3, "activation": "tanh", "maxout_pieces": 2,
         "weight_init": "xavier_uniform", "batch_norm": False, "dropout_convention": "inverted"},
    )  # fmt: skip
    assert c.optimizer == OptimizerConfig(
        "momentum", {"learning_rate": 0.05, "momentum": 0.8, "weight_decay": 1e-5}, "step"
    )
    assert c.training == Training(epochs=4, batch_size=50, early_stopping=ES)
    assert c.regularisation == Regularisation(l2=1e-4, dropout=0.3, dropout_input=0.1)
    assert c.checkpointing == Checkpointing(every=2) and c.data == DataConfig()
    assert c.kernels == "off"
    # The objects come back equal: the config describes them, nothing is lost.
    assert c.model.build() == jaxdl.MLP(hidden=(32, 16), num_classes=3, activation="tanh")
    opt = c.optimizer.build()
    assert opt == jaxdl.make_optimizer("momentum", schedule="step", weight_decay=1e-5)
    assert opt.hyperparams["learning_rate"] == 0.05 and opt.decay


def test_json_round_trip_is_exact():
    c = _config()
    text = json.dumps(c.to_dict())
    assert RunConfig.from_dict(json.loads(text)) == c
    assert RunConfig.from_dict({}) == RunConfig()  # missing keys take the defaults


def test_unknown_settings_name_the_key_and_the_nearest_one():
    with pytest.raises(
        jaxdl.InputError, match=r"unknown setting 'lerning_rate' \(did you mean 'learning_rate'"
    ):
        RunConfig.of(lerning_rate=0.1)
    with pytest.raises(jaxdl.InputError, match=r"'trainig' \(did you mean 'training'"):
        RunConfig.from_dict({"trainig": {"epochs": 3}})
    with pytest.raises(jaxdl.InputError, match=r"training: unknown key 'epoch' .*'epochs'"):
        RunConfig.from_dict({"training": {"epoch": 3}})
    with pytest.raises(jaxdl.InputError, match=r"argument 'hiden' \(did you mean 'hidden'"):
        ModelConfig("mlp", {"hiden": [8]}).build()
    with pytest.raises(jaxdl.InputError, match="expected a jaxdl.RunConfig"):
        jaxdl.prepare({"epochs": 3}, jaxdl.synthetic(64, num_features=4, num_classes=2))


def test_prepare_from_a_config_is_fit(blobs):
    """``fit(model, optimizer, data, **keywords)`` is ``prepare(RunConfig.of(...))``, one
    compiled program, and the same numbers."""
    model = jaxdl.MLP(hidden=(16,), num_classes=3)
    opt = jaxdl.make_optimizer("adam", learning_rate=3e-3)
    kw = dict(epochs=2, batch_size=64, dropout=0.2, l2=1e-4, early_stopping=ES)
    fitted, hist = jaxdl.fit(model, opt, blobs.train, validation=blobs.valid, key=3, **kw)
    config = RunConfig.of(model, opt, seed=3, **kw)
    setup, hp = jaxdl.prepare(config, blobs.train, blobs.valid)
    progs = compiled.programs(setup)
    traced = progs.traces["epoch"]
    state, again = train.fit_state(setup, progs.init(jax.random.key(3), hp), hp, blobs.train,
                                   blobs.valid)  # fmt: skip
    assert progs.traces["epoch"] == traced  # fit compiled it already
    assert again == hist
    assert jaxdl.params_digest(state.params) == jaxdl.params_digest(fitted.params)


def test_dropout_input_sets_the_first_masked_layer():
    model = jaxdl.MLP(hidden=(8, 8), num_classes=2)
    hp = jaxdl.make_hparams(model, jaxdl.make_optimizer("sgd"), (4,), dropout=0.5,
                            dropout_input=0.2)  # fmt: skip
    np.testing.assert_allclose(hp.dropout, [0.2, 0.5, 0.5])
    with pytest.raises(jaxdl.InputError, match="one rate for the hidden layers"):
        jaxdl.make_hparams(model, jaxdl.make_optimizer("sgd"), (4,), dropout=[0.1, 0.2, 0.3],
                           dropout_input=0.2)  # fmt: skip


def test_flags_build_the_same_config_as_keywords():
    a = cli.build_parser().parse_args(
        ["train", "--hidden", "32,16", "--activation", "tanh", "--optimizer", "momentum",
         "--lr", "0.05", "--momentum", "0.8", "--schedule", "step", "--epochs", "4",
         "--batch-size", "50", "--early-stopping", "3", "--min-delta", "0.001",
         "--no-restore-best", "--l2", "1e-4", "--dropout-hidden", "0.3", "--dropout-input",
         "0.1", "--weight-decay", "1e-5", "--checkpoint-every", "2", "--kernels", "off"]
    )  # fmt: skip
    from_flags = RunConfig.from_flags(vars(a))
    want = _config()
    args = {k: v for k, v in want.model.args.items() if k != "num_classes"}  # from the data
    assert from_flags.model == ModelConfig("mlp", args)
    for section in ("optimizer", "training", "regularisation", "checkpointing", "data"):
        assert getattr(from_flags, section) == getattr(want, section), section
    assert from_flags.kernels == "off"
    # ... and back: the flag-named view reads as the same flags.
    assert RunConfig.from_flags(from_flags.as_flags()) == from_flags


def test_a_cli_run_is_reproduced_from_its_config_json_in_python(tiny_runs):
    """``config.json`` holds the run's RunConfig: read back with ``RunConfig.load`` and
    prepared on the same data, it trains the same parameters as the CLI did."""
    root, data_path = tiny_runs
    run = root / "t"
    config = RunConfig.load(run)
    saved = json.loads((run / "config.json").read_text())
    assert saved["run"] == config.to_dict() and saved["command"] == "train"
    assert config.model.args["hidden"] == (32, 16) and config.training.epochs == 3
    assert "runs_dir" in saved["options"] and "epochs" not in saved["options"]
    assert saved_flags(saved)["hidden"] == [32, 16]
    splits = jaxdl.load(str(data_path))
    setup, hp = jaxdl.prepare(config, splits.train, splits.valid)
    state = compiled.programs(setup).init(jax.random.key(config.training.seed), hp)
    state, _ = train.fit_state(setup, state, hp, splits.train, splits.valid)
    results = json.loads((run / "results.json").read_text())
    assert jaxdl.params_digest(state.params) == results["params_digest"]
    with pytest.raises(jaxdl.InputError, match="no run configuration"):
        RunConfig.load(run / "results.json")
