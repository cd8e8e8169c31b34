"""``jaxdl ensemble``: a trained dropout network as an ensemble of subnetworks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxdl import (
    checkpoint,
    compiled,
    data,
    ensemble,
    report,
    runs,
    step,
    train,
    validate,
)
from jaxdl.cli.build import load_data, run_config, saved_config, write_config
from jaxdl.cli.parser import build_parser
from jaxdl.cli.resume import (
    _checkpointer,
    _given_flags,
    _run_config,
    _with_settings,
    resume_command,
)
from jaxdl.validate import InputError


def cmd_ensemble(a: argparse.Namespace, argv: Sequence[str] = ()) -> dict:
    for flag in ("k", "repeats", "max_units", "ood_size"):
        validate.positive_int("--" + flag.replace("_", "-"), getattr(a, flag))
    validate.positive_int("--explicit", a.explicit, allow_zero=True)
    if a.test_size is not None:
        validate.positive_int("--test-size", a.test_size)
    if a.tensorboard:
        raise InputError("--tensorboard: not available for ensemble (use jaxdl train)")
    if a.from_run is None and ":" in a.model:  # a module of one's own: its own rates
        given = _given_flags(argv)
        for dest in ("dropout_input", "dropout_hidden"):
            if dest not in given:
                setattr(a, dest, None)
    # t: the settings of the net (this command's train flags, or the --from run's)
    t = a if a.from_run is None else _trained_settings(a, argv)
    config, splits, tr = load_data(t, run_config(t))
    config = config.replace(kernels=a.kernels)
    setup, hp = train.prepare(config, tr, splits.valid)
    model, rates = setup.model, [float(r) for r in hp.dropout]
    ensemble.check_rates(model, rates, setup.feature_shape)  # a model with no masked layer
    if max(rates) <= 0:
        flag = "--from" if a.from_run is not None else "--dropout-input/--dropout-hidden"
        raise InputError(f"{flag}: the ensemble view needs dropout; expected a rate above 0, "
                         "got 0")  # fmt: skip
    widths = setup.widths
    units = sum(w for w, r in zip(widths, rates, strict=True) if r > 0)
    if a.exact == "on" and units > a.max_units:
        raise InputError(f"--exact on: {units} masked units are more than --max-units "
                         f"{a.max_units}; mask fewer units or use --exact auto")  # fmt: skip
    test = splits.test if a.test_size is None else data.subset(splits.test, a.test_size)
    seed = config.training.seed
    state = compiled.programs(setup).init(train.as_key(seed), hp)
    if a.from_run is not None:  # before a run directory exists: a bad run writes nothing
        state = _trained_state(t.from_run, config, setup, hp, tr, state)
    run_dir = report.make_run_dir(a.runs_dir, a.name, prefix="ensemble")
    write_config(run_dir, saved_config(a, config, run_dir=str(run_dir)))
    if a.from_run is None:
        with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
            state, history = train.fit_state(
                setup, state, hp, tr, splits.valid, on_epoch=prog.update
            )
            prog.finish(best_epoch=train.best_epoch(state) or None)
        report.save_history(run_dir, history)
    key = jax.random.fold_in(train.as_key(seed), 7)
    exact = {"auto": None, "on": True, "off": False}[a.exact]
    result = ensemble.analyse(
        model, ensemble.variables_of(state), rates, test, key=key, k=a.k, repeats=a.repeats,
        exact=exact, max_units=a.max_units, ood_size=min(a.ood_size, len(test.x)),
        kernels=a.kernels,
    )  # fmt: skip
    explicit = {}
    if a.explicit:
        trained = ensemble.train_explicit(
            config.replace(seed=seed + 1), tr, n=a.explicit, rates=rates,
            key=jax.random.fold_in(key, 1), validation=splits.valid, verbose=not a.no_progress,
        )  # fmt: skip
        for name in ("independent", "bagging"):
            masks = trained["masks"] if name == "bagging" else None
            explicit[name] = ensemble.member_stats(
                model, trained[name].states, test.x, test.y, masks=masks, kernels=a.kernels
            )
    summary = ensemble.summary(result)
    for name, stats in explicit.items():
        summary[f"{name}_accuracy"] = {
            str(j + 1): float(v) for j, v in enumerate(stats["accuracy"])
        }
    summary["run_dir"] = str(run_dir)
    summary["kernels"] = setup.lowering.kernels
    report.write_json(run_dir / "ensemble.json", {**result, "explicit": explicit})
    report.write_json(run_dir / "summary.json", summary)
    if not a.no_plots:
        rates_text = "/".join(f"{r:g}" for r in rates)
        title = f"{run_dir.name}: {runs.describe_model(config.as_flags())}, dropout {rates_text}"
        report.plot_ensemble(result, run_dir, explicit=explicit, title=title)
    return summary


# The flags of ``ensemble`` that are not the net's settings (allowed with --from).
_ENSEMBLE_OWN = ("command", "from_run", "k", "repeats", "exact", "max_units", "explicit",
                 "test_size", "ood_size", "name", "runs_dir", "json", "no_progress",
                 "no_plots", "data_dir", "config", "kernels")  # fmt: skip


def _trained_settings(a: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """The settings of the finished train run ``a.from_run`` (every train flag, as
    ``jaxdl train`` parsed them), with ``a``'s data directory; refuses train flags given
    with ``--from`` (they would describe another net than the one loaded)."""
    run_dir = Path(a.from_run)
    config = _run_config("--from", run_dir, "train")
    if not (run_dir / "results.json").exists():
        raise InputError(f"--from: {str(run_dir)!r} has not finished (no results.json); "
                         f"finish it with: {resume_command('train', run_dir)}")  # fmt: skip
    for dest in _given_flags(argv):
        if dest not in _ENSEMBLE_OWN:
            flag = "--" + dest.replace("_", "-")
            raise InputError(f"{flag}: with --from the net and its settings are those of "
                             f"{str(run_dir)!r}; give only the ensemble flags")  # fmt: skip
    t = _with_settings(build_parser().parse_args(["train"]), config, keep=())
    t.update(data_dir=a.data_dir, from_run=run_dir)
    return argparse.Namespace(**t)


def _trained_state(run_dir: Path, config, setup, hp, tr, like) -> step.TrainState:
    """The final state of the train run in ``run_dir``, read from its last checkpoint and
    checked against the ``params_digest`` its results.json reports."""
    desc = checkpoint.describe(setup, hp, tr.x, tr.y)
    ckpt = _checkpointer(config.checkpointing, run_dir, desc)
    saved = None if ckpt is None else ckpt.restore(like)
    if saved is None:
        raise InputError(f"--from: {str(run_dir)!r} kept no checkpoint (it was run with "
                         "--checkpoint-every 0); train it again with checkpoints")  # fmt: skip
    state = train.final_state(setup, saved.state)
    reported = json.loads((run_dir / "results.json").read_text()).get("params_digest")
    if report.params_digest(state.params) != reported:
        raise InputError(f"--from: the last checkpoint of {str(run_dir)!r} (epoch "
                         f"{saved.epoch}) does not hold the parameters its results.json "
                         "reports (params_digest differs)")  # fmt: skip
    return state
