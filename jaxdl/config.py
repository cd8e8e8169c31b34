"""The run configuration: everything a training run is, as one frozen, JSON-serialisable value.

.. code-block:: text

    RunConfig
      model           ModelConfig(module="mlp", args={"hidden": (500, 500), ...})
      optimizer       OptimizerConfig(name="adam", hyperparams={"learning_rate": ...}, ...)
      data            DataConfig(source="mnist", preprocess="none", train_size=None)
      training        Training(epochs, batch_size, seed, loss, early_stopping, ...)
      regularisation  Regularisation(l1, l2, dropout, dropout_input, input_noise, init_scale)
      checkpointing   Checkpointing(every, keep)
      kernels         "auto" | "on" | "off": how the program is lowered, not what it computes

Python keywords (``RunConfig.of``), CLI flags and ``--config`` files (``from_flags``) all
build one; ``jaxdl.prepare(config, train, validation)`` turns it into the static ``Setup``
and the traced ``HParams``; a run directory's ``config.json`` holds ``to_dict()`` under
``"run"`` and ``RunConfig.load(run_dir)`` reads it back. Values are checked where they
are used (``prepare``), so a config can be written, read and compared without data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn

from jaxdl import model_source, optim, validate
from jaxdl.model_config import ModelConfig, module_fields
from jaxdl.optim import Optimizer
from jaxdl.stopping import EarlyStopping
from jaxdl.validate import InputError

# Written into a run's config.json for the record; ignored when it is read back.
RECORD_KEYS = ("command", "resolved", "run_dir")

MODULES = model_source.BUILTIN  # jaxdl's own modules, by name


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def unknown_setting(key: str, more=()) -> InputError:
    """The error for a run setting no section has (``more``: other valid names)."""
    valid = sorted([*_keyword_targets(), *optim.defaults("adam"), *more, "kernels"])
    return _unknown("run settings", key, valid, "setting")


_unknown = validate.unknown


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer family, its numbers (those not given are the family's defaults,
    ``optim.defaults``), its schedule and its structure. ``clip``/``decay``/``constrain``
    put a pass into the chain even where the numbers do not need it (a sweep whose
    members differ in it)."""

    name: str = "adam"
    hyperparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
    schedule: str = "constant"
    freeze: tuple[str, ...] = ()
    layer_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
    clip: bool = False
    decay: bool = False
    constrain: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hyperparams", dict(self.hyperparams))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "layer_lr", dict(self.layer_lr))

    def build(self) -> Optimizer:
        opt = optim.make_optimizer(
            self.name, schedule=self.schedule, freeze=self.freeze, layer_lr=self.layer_lr,
            **self.hyperparams,
        )  # fmt: skip
        return dataclasses.replace(
            opt, clip=opt.clip or self.clip, decay=opt.decay or self.decay,
            constrain=opt.constrain or self.constrain,
        )  # fmt: skip

    @classmethod
    def of(cls, opt: Optimizer) -> OptimizerConfig:
        """The config that builds ``opt`` again (numbers that differ from the defaults)."""
        if not isinstance(opt, Optimizer):
            raise InputError(
                f"optimizer: expected an Optimizer from jaxdl.make_optimizer, got "
                f"{type(opt).__name__}"
            )
        base = optim.defaults(opt.name)
        numbers = {k: float(v) for k, v in opt.hyperparams.items() if base.get(k) != v}
        return cls(opt.name, numbers, opt.schedule, opt.freeze, dict(opt.layer_lr),
                   opt.clip, opt.decay, opt.constrain)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from (``"mnist"`` or an ``.npz`` path), its standardisation
    and how many training examples are used (None: all)."""

    source: str = "mnist"
    preprocess: str = "none"
    train_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Training:
    """The loop: epochs, minibatches, seed, data loss, early stopping, NaN handling."""

    epochs: int = 20
    batch_size: int = 100
    seed: int = 0
    loss: str = "cross_entropy"
    early_stopping: EarlyStopping | None = None
    eval_batch_size: int = 1000
    skip_nonfinite: bool = False


@dataclasses.dataclass(frozen=True)
class Regularisation:
    """Penalties and noise. ``dropout``: one rate for every masked layer or one per layer
    (input first); ``dropout_input``, if given, the input layer's rate (then ``dropout``
    is the hidden layers'). ``init_scale`` None: the initialiser's own."""

    l1: float = 0.0
    l2: float = 0.0
    dropout: float | tuple[float, ...] | None = None
    dropout_input: float | None = None
    input_noise: float = 0.0
    init_scale: float | None = None

    def __post_init__(self):
        if isinstance(self.dropout, list | tuple):
            object.__setattr__(self, "dropout", tuple(self.dropout))


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Save every ``every`` epochs (0: never), keeping the ``keep`` latest (and the best)."""

    every: int = 1
    keep: int = 2


_SECTIONS = {
    "data": DataConfig,
    "training": Training,
    "regularisation": Regularisation,
    "checkpointing": Checkpointing,
}
# Python keywords that name a field of a section by another name (``every`` alone, or
# ``source``, would not say what they set).
_ALIASES = {"checkpoint_every": ("checkpointing", "every"),
            "keep_checkpoints": ("checkpointing", "keep"), "data": ("data", "source")}  # fmt: skip


def _keyword_targets() -> dict[str, tuple[str, str]]:
    out = {f.name: (s, f.name) for s, c in _SECTIONS.items() for f in dataclasses.fields(c)
           if s != "checkpointing" and f.name != "source"}  # fmt: skip
    return {**out, **_ALIASES}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run is; see the module's docstring."""

    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    training: Training = Training()
    regularisation: Regularisation = Regularisation()
    checkpointing: Checkpointing = Checkpointing()
    kernels: str = "auto"

    @classmethod
    def of(
        cls,
        model: nn.Module | ModelConfig | None = None,
        optimizer: Optimizer | OptimizerConfig | None = None,
        **settings: Any,
    ) -> RunConfig:
        """A config from Python objects and keywords, each keyword going to the section
        that has it: ``RunConfig.of(jaxdl.MLP((256,)), opt, epochs=5, l2=1e-4,
        learning_rate=3e-3)``. A keyword naming one of the optimizer family's numbers sets it."""
        model = ModelConfig() if model is None else model
        optimizer = OptimizerConfig() if optimizer is None else optimizer
        if not isinstance(model, ModelConfig):
            model = ModelConfig.of(model)
        if not isinstance(optimizer, OptimizerConfig):
            optimizer = OptimizerConfig.of(optimizer)
        return cls(model, optimizer).replace(**settings)

    def replace(self, **settings: Any) -> RunConfig:
        """A copy with the given settings changed (the keywords of ``of``)."""
        targets = _keyword_targets()
        numbers = optim.defaults(self.optimizer.name)
        parts: dict[str, dict[str, Any]] = {}
        hyper = dict(self.optimizer.hyperparams)
        top: dict[str, Any] = {}
        for key, value in settings.items():
            if key in ("model", "optimizer", "kernels"):
                top[key] = value
            elif key in targets:
                section, name = targets[key]
                parts.setdefault(section, {})[name] = value
            elif key in numbers:
                hyper[key] = value
            elif self.model.module not in MODULES:  # the module's own number, checked in prepare
                parts.setdefault("model", {}).setdefault("numbers", dict(self.model.numbers))
                parts["model"]["numbers"][key] = value
            else:
                valid = sorted([*targets, *numbers, "kernels"])
                raise _unknown("run settings", key, valid, "setting")
        sections = {s: dataclasses.replace(getattr(self, s), **v) for s, v in parts.items()}
        if hyper != self.optimizer.hyperparams:
            sections["optimizer"] = dataclasses.replace(self.optimizer, hyperparams=hyper)
        return dataclasses.replace(self, **sections, **top)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists for tuples), one key per section, plus ``kernels``."""
        values = dataclasses.asdict(self)
        del values["model"]["cls"]  # the class is named by ``module``
        try:
            return json.loads(json.dumps(values))
        except TypeError:
            bad = [k for k, v in self.model.args.items() if not _json_ok(v)]
            raise InputError(
                f"model {self.model.module}: arguments {', '.join(bad)} are not JSON values "
                "(numbers, strings, lists): a run cannot record them"
            ) from None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """The inverse of ``to_dict``; a missing key takes its default. An unknown section
        or key raises ``InputError`` naming it and ``source``."""
        if not isinstance(values, Mapping):
            raise InputError(f"{source}: expected a table of sections, got {values!r}")
        classes = {"model": ModelConfig, "optimizer": OptimizerConfig, **_SECTIONS}
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key == "kernels":
                out[key] = value
                continue
            if key not in classes:
                raise _unknown(source, key, [*classes, "kernels"])
            names = [f.name for f in dataclasses.fields(classes[key])]
            if not isinstance(value, Mapping):
                raise InputError(f"{source}: {key}: expected a table, got {value!r}")
            for k in value:
                if k not in names:
                    raise _unknown(f"{source}: {key}", k, names)
            fields = dict(value)
            if key == "training" and isinstance(fields.get("early_stopping"), Mapping):
                fields["early_stopping"] = EarlyStopping(**fields["early_stopping"])
            out[key] = classes[key](**fields)
        return cls(**out)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """The config of a run directory (or of its ``config.json``)."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{str(path)!r}: cannot read a run's config.json ({e})") from None
        if not isinstance(saved, dict) or "run" not in saved:
            raise InputError(f"{str(path)!r}: holds no run configuration (no 'run' key)")
        return cls.from_dict(saved["run"], source=str(path))

    # -- the same settings named like the command line's flags (``--batch-size`` ->
    # ``batch_size``): what CLI flags and hand-written ``--config`` files give, and what
    # ``jaxdl compare`` and the HTML report show.

    def as_flags(self) -> dict[str, Any]:
        """The settings that have a flag, keyed by the flag's dest (``lr``, ``hidden``, …)."""
        m, o, t, r = self.model, self.optimizer, self.training, self.regularisation
        out: dict[str, Any] = {"model": m.module}
        if m.module in MODULES:
            out |= {flag: m.args[field] for flag, field in MODEL_FLAGS.items() if field in m.args}
        else:  # a module of the user's own: its arguments and numbers as given
            out["model_args"] = dict(m.args)
            if m.numbers:
                out["model_numbers"] = dict(m.numbers)
        out |= {"optimizer": o.name, "lr": o.hyperparams.get("learning_rate")}
        out |= {k: o.hyperparams.get(k) for k in OPTIMIZER_FLAGS}
        out |= {"schedule": o.schedule, "freeze": o.freeze, "layer_lr": dict(o.layer_lr)}
        out |= {k: getattr(t, k) for k in ("epochs", "batch_size", "seed", "loss")}
        if t.skip_nonfinite:  # a flag of train only
            out["skip_nonfinite"] = True
        if (es := t.early_stopping) is not None:
            out |= {"early_stopping": es.patience or 0, "monitor": es.monitor,
                    "min_delta": es.min_delta, "no_restore_best": not es.restore_best}  # fmt: skip
        out |= {k: getattr(r, k) for k in ("l1", "l2", "input_noise", "init_scale")}
        out |= {"dropout_input": r.dropout_input, "dropout_hidden": r.dropout}
        out |= {"data": self.data.source, "preprocess": self.data.preprocess,
                "train_size": self.data.train_size}  # fmt: skip
        out |= {"checkpoint_every": self.checkpointing.every,
                "keep_checkpoints": self.checkpointing.keep, "kernels": self.kernels}  # fmt: skip
        return out

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> RunConfig:
        """The config the training flags describe (``vars`` of a parsed command line);
        a flag that is missing takes the config's default."""
        d = cls()
        get = flags.get
        module = get("model", d.model.module)
        known = module_fields(MODULES[module]) if module in MODULES else []
        args = {f: flags[k] for k, f in MODEL_FLAGS.items() if f in known and k in flags}
        args |= get("model_args") or {}
        numbers = {k: get(k) for k in OPTIMIZER_FLAGS if get(k) is not None}
        if get("lr") is not None:
            numbers["learning_rate"] = get("lr")
        es = None
        if "early_stopping" in flags:  # 0: never stop, but still keep the best epoch
            es = EarlyStopping(get("monitor", "val_loss"), get("early_stopping") or None,
                               get("min_delta", 0.0), not get("no_restore_best", False))  # fmt: skip
        o, t, r, c = d.optimizer, d.training, d.regularisation, d.checkpointing
        # Unset dropout flags: none for jaxdl's modules, each jaxdl.Dropout's own rate else.
        rates = [get("dropout_hidden"), get("dropout_input")]
        if module in MODULES:
            rates = [0.0 if v is None else v for v in rates]
        return cls(
            ModelConfig(module, args, get("model_numbers") or {}),
            OptimizerConfig(get("optimizer", o.name), numbers, get("schedule", o.schedule),
                            get("freeze", o.freeze), get("layer_lr") or {}),
            DataConfig(get("data", d.data.source), get("preprocess", d.data.preprocess),
                       get("train_size")),
            Training(get("epochs", t.epochs), get("batch_size", t.batch_size),
                     get("seed", t.seed), get("loss", t.loss), es,
                     skip_nonfinite=bool(get("skip_nonfinite", False))),
            Regularisation(get("l1", r.l1), get("l2", r.l2), *rates, get("input_noise", r.input_noise),
                           get("init_scale")),
            Checkpointing(get("checkpoint_every", c.every), get("keep_checkpoints", c.keep)),
            get("kernels", d.kernels),
        )  # fmt: skip


# Model flags and the module fields they set.
MODEL_FLAGS = {"hidden": "hidden", "conv_features": "features", "conv_kernel": "kernel_size",
               "conv_dense": "dense", "activation": "activation",
               "maxout_pieces": "maxout_pieces", "init": "weight_init",
               "batch_norm": "batch_norm", "dropout_convention": "dropout_convention"}  # fmt: skip
# Optimizer numbers with a flag of their own name (the learning rate is ``--lr``).
OPTIMIZER_FLAGS = ("momentum", "b1", "b2", "eps", "decay", "weight_decay",
                   "decay_start_epoch", "clip_norm", "max_norm", "lr_decay", "lr_decay_every",
                   "lr_patience", "warmup_epochs", "lr_min_ratio")  # fmt: skip
# Every flag a RunConfig holds: the rest of a command line is how the run is shown.
RUN_FLAGS = frozenset([*RunConfig().as_flags(), *MODEL_FLAGS, *OPTIMIZER_FLAGS, "model_args", "model_numbers",
                       "skip_nonfinite", "early_stopping", "monitor", "min_delta",
                       "no_restore_best"])  # fmt: skip


def saved_flags(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run directory's ``config.json`` as flag-named settings (JSON values): its run's
    ``as_flags()``, then its sweep ``space`` and its ``options``, with the record keys as
    they are. A file that is flat already (hand-written) is returned as it is."""
    if not isinstance(saved.get("run"), Mapping):
        return dict(saved)
    run = RunConfig.from_dict(saved["run"], source="config.json: run")
    rest = {k: v for k, v in saved.items() if k not in ("run", "space", "options")}
    flat = {**rest, **run.as_flags(), **saved.get("space", {}), **saved.get("options", {})}
    return json.loads(json.dumps(flat))
