"""TensorBoard event files, read back with TensorBoard's own reader: tags, steps and values
of a training run and of a sweep (HParams plugin data included)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from jaxdl import cli, tracking

pytest.importorskip("tensorboardX", reason="tensorboardX is in the 'test' extra")
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard (the event reader) is in the 'test' extra",
)
hp_metadata = pytest.importorskip("tensorboard.plugins.hparams.metadata")


def _events(path):
    ea = event_accumulator.EventAccumulator(
        str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    ea.Reload()
    return ea


def _scalars(ea, tag) -> tuple[list[int], np.ndarray]:
    events = ea.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events])


def test_scalar_tags():
    assert tracking.scalar_tag("train_loss") == "loss/train"
    assert tracking.scalar_tag("val_accuracy") == "accuracy/val"
    assert tracking.scalar_tag("learning_rate") == "learning_rate"
    assert tracking.scalar_tag("grad_norm/layer_0") == "grad_norm/layer_0"


def test_histograms_hold_the_exact_values(tmp_path):
    import tensorboardX

    params = {"layer_0": {"kernel": np.arange(12.0).reshape(3, 4) - 5.5, "bias": np.zeros(4)}}
    acts = {"layer_0": np.array([[0.0, 1.0], [2.0, np.nan]])}  # NaN is left out
    with tensorboardX.SummaryWriter(logdir=str(tmp_path)) as w:
        tracking.log_histograms(w, 3, params, acts)
    ea = _events(tmp_path)
    assert set(ea.Tags()["histograms"]) == {
        "weights/layer_0/kernel",
        "weights/layer_0/bias",
        "activations/layer_0",
    }
    (k,) = ea.Histograms("weights/layer_0/kernel")
    h = k.histogram_value
    assert k.step == 3 and (h.num, h.min, h.max, h.sum) == (12, -5.5, 5.5, 0.0)
    assert h.sum_squares == pytest.approx(float(((np.arange(12.0) - 5.5) ** 2).sum()))
    assert sum(h.bucket) == 12
    a = ea.Histograms("activations/layer_0")[0].histogram_value
    assert (a.num, a.min, a.max, a.sum) == (3, 0.0, 2.0, 3.0)


def test_resumed_run_shows_each_epoch_once(tiny_runs, tmp_path, capsys, monkeypatch):
    # The first run logs epoch 3 and dies before checkpointing it; the resumed run
    # restarts after epoch 2 and logs epochs 3-4 again. TensorBoard must show one value
    # per epoch: the resumed run's, equal to the final history.
    from jaxdl import checkpoint

    _, data_path = tiny_runs
    argv = ["train", "--data", str(data_path), "--hidden", "8", "--epochs", "4", "--batch-size",
            "50", "--runs-dir", str(tmp_path), "--name", "r", "--tensorboard", "--no-progress",
            "--no-plots"]  # fmt: skip
    real = checkpoint.Checkpointer.after_epoch

    def crash_at_3(self, epoch, *args, **kw):
        if epoch == 3:
            raise OSError("disk full")
        return real(self, epoch, *args, **kw)

    monkeypatch.setattr(checkpoint.Checkpointer, "after_epoch", crash_at_3)
    with pytest.raises(OSError, match="disk full"):
        cli.main(argv)
    monkeypatch.setattr(checkpoint.Checkpointer, "after_epoch", real)
    assert cli.main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    ea = _events(tmp_path / "r")
    for key in ("train_loss", "val_accuracy", "grad_norm/layer_0"):
        steps, got = _scalars(ea, tracking.scalar_tag(key))
        assert steps == [1, 2, 3, 4], key
        np.testing.assert_allclose(got, history[key], rtol=1e-6, err_msg=key)
    assert [h.step for h in ea.Histograms("weights/output/kernel")] == [1, 2, 3, 4]
    assert len(ea.Tensors("config/text_summary")) == 1  # the settings, written once


def test_train_run_events_match_history(tiny_runs):
    root, _ = tiny_runs
    run = root / "t"
    history = json.loads((run / "history.json").read_text())
    results = json.loads((run / "results.json").read_text())
    ea = _events(run)
    tags = ea.Tags()
    n = len(history["train_loss"])
    assert n == 3
    expected = {tracking.scalar_tag(k) for k in history}
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "learning_rate",
            "grad_norm/layer_0", "grad_norm/output", "act_std/layer_1",
            "dead_fraction/layer_0"} <= expected  # fmt: skip
    assert expected | {f"results/{k}" for k in ("test_accuracy", "test_loss")} <= set(
        tags["scalars"]
    )
    for key, values in history.items():
        steps, got = _scalars(ea, tracking.scalar_tag(key))
        assert steps == [1, 2, 3], key
        np.testing.assert_allclose(got, values, rtol=1e-6, err_msg=key)
    steps, got = _scalars(ea, "results/test_accuracy")
    assert steps == [3] and got[0] == pytest.approx(results["test_accuracy"], rel=1e-6)
    # Weight histograms per epoch, one per parameter, with every weight counted.
    sizes = {"layer_0/kernel": 784 * 32, "layer_0/bias": 32, "layer_1/kernel": 32 * 16,
             "layer_1/bias": 16, "output/kernel": 16 * 4, "output/bias": 4}  # fmt: skip
    for name, size in sizes.items():
        hists = ea.Histograms(f"weights/{name}")
        assert [h.step for h in hists] == [1, 2, 3]
        assert all(h.histogram_value.num == size for h in hists)
    kernel = [h.histogram_value for h in ea.Histograms("weights/layer_0/kernel")]
    assert kernel[0].sum_squares != kernel[-1].sum_squares  # the weights moved
    # Activation histograms on the probe batch (all 200 training examples here): their
    # std equals the act_std the compiled epoch measured on the same batch.
    for layer, width in (("layer_0", 32), ("layer_1", 16)):
        hists = ea.Histograms(f"activations/{layer}")
        assert [h.step for h in hists] == [1, 2, 3]
        for h, act_std in zip(hists, history[f"act_std/{layer}"], strict=True):
            v = h.histogram_value
            assert v.num == 200 * width and v.min >= 0.0  # ReLU
            std = np.sqrt(max(v.sum_squares / v.num - (v.sum / v.num) ** 2, 0.0))
            assert std == pytest.approx(act_std, rel=1e-3)
    config = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"hidden": [' in config and '"seed": 0' in config


def test_sweep_writes_one_run_per_member_and_the_hparams_table(tiny_runs):
    root, _ = tiny_runs
    run = root / "s"
    rows = json.loads((run / "results.json").read_text())
    history = json.loads((run / "history.json").read_text())
    members = sorted(p.name for p in run.glob("member-*"))
    assert members == ["member-000", "member-001", "member-002", "member-003"]
    content = _events(run).PluginTagToContent("hparams")
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    assert [h.name for h in experiment.hparam_infos] == ["learning_rate", "seed"]
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"results/best_val_accuracy", "results/test_accuracy", "results/test_loss"} <= metrics
    for i, row in enumerate(rows):
        ea = _events(run / f"member-{i:03d}")
        content = ea.PluginTagToContent("hparams")
        start = hp_metadata.parse_session_start_info_plugin_data(
            content[hp_metadata.SESSION_START_INFO_TAG]
        )
        assert hp_metadata.SESSION_END_INFO_TAG in content
        hparams = {k: v.number_value for k, v in start.hparams.items()}
        assert hparams == {
            "learning_rate": pytest.approx(row["learning_rate"]),
            "seed": row["seed"],
        }
        for tag in metrics:  # every metric of the table has its value in the member's run
            steps, got = _scalars(ea, tag)
            assert got[-1] == pytest.approx(row[tag.removeprefix("results/")], rel=1e-6)
        steps, got = _scalars(ea, "accuracy/val")
        assert steps == [1, 2]
        np.testing.assert_allclose(got, history["val_accuracy"][i], rtol=1e-6)
        (kernel,) = ea.Histograms("weights/layer_0/kernel")
        assert kernel.histogram_value.num == 784 * 16
    lrs = {r["learning_rate"] for r in rows}
    assert len(lrs) == 2  # the table has both settings


def test_missing_tensorboardx_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import fail
    code = cli.main(
        ["train", "--tensorboard", "--runs-dir", str(tmp_path / "r"), "--data", "x.npz"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'jaxdl[tensorboard]'" in err
    assert not (tmp_path / "r").exists()


def test_a_run_resumed_within_the_same_second_keeps_the_earlier_events(tmp_path, monkeypatch):
    """tensorboardX names event files by the second and the host: two writers in one
    directory within a second would share a file, the second truncating the first."""
    import types

    from tensorboardX import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.8e9))
    first = tracking.RunWriter(tmp_path, None, None, None)
    for epoch in (1, 2):
        first.epoch(epoch, {"train_loss": 1.0 / epoch})
    first.close()
    resumed = tracking.RunWriter(tmp_path, None, None, None, resumed_from=2)
    for epoch in (3, 4):
        resumed.epoch(epoch, {"train_loss": 1.0 / epoch})
    resumed.close()
    assert len(list(tmp_path.iterdir())) == 2
    steps, values = _scalars(_events(tmp_path), tracking.scalar_tag("train_loss"))
    assert steps == [1, 2, 3, 4]
    np.testing.assert_allclose(values, [1.0, 0.5, 1 / 3, 0.25], rtol=1e-6)
