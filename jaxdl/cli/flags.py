"""The flags shared by the training commands (model, optimizer, data, regularisation,
early stopping, checkpoints) and the argparse types that read their values.
"""

from __future__ import annotations

import argparse
import difflib
import json
import textwrap
from pathlib import Path

from jaxdl import (
    inits,
    losses,
    lowering,
    model_source,
    models,
    optim,
    stopping,
    sweep,
)
from jaxdl.validate import InputError


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line and exits 2 (never prints usage), takes
    no abbreviations (``--epoch`` is not ``--epochs``) and names the nearest flag to an
    unknown one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        a, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(a)
            flags = [o for act in command._actions for o in act.option_strings]
            first = extras[0]
            name = first.partition("=")[0]
            if name.startswith("-"):
                near = difflib.get_close_matches(name, flags, n=1, cutoff=0.7)
                hint = f" (did you mean {near[0]}?)" if near else ""
                command.error(f"unknown flag {name}{hint}; see {command.prog} --help")
            command.error(f"unexpected argument {first!r}; see {command.prog} --help")
        return a

    def _command_parser(self, a: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub)command's parser that ``a`` was parsed by (``self`` if none)."""
        for act in self._actions:
            if isinstance(act, argparse._SubParsersAction):
                chosen = act.choices.get(getattr(a, act.dest, None))
                if chosen is not None:
                    return chosen._command_parser(a) if isinstance(chosen, _Parser) else chosen
        return self


def shown(value) -> str:
    """A default as it is typed on the command line: ``500,500``, ``a=1,b=2``."""
    if isinstance(value, tuple | list):
        return ",".join(map(shown, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={shown(v)}" for k, v in value.items())
    return str(value)


class _Help(argparse.HelpFormatter):
    """Help that shows each real default once, as it would be typed (a flag whose help
    already says its default, or whose default is "not given", shows none), and keeps the
    lines of an ``examples:`` block as they are."""

    def _split_lines(self, text, width):  # never split a flag such as --lr-decay at its "-"
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        body, sep, examples = text.partition("examples:\n")
        out = "\n".join(indent + line for line in self._split_lines(body, width - len(indent)))
        if sep:
            lines = [indent + line for line in examples.splitlines()]
            out = (out + "\n\n" if out else "") + indent + "examples:\n" + "\n".join(lines)
        return out

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        empty = d is None or d is False or d is argparse.SUPPRESS or d in ((), {}, [])
        if "default" in text or empty or not (action.option_strings or action.nargs == "?"):
            return text
        return f"{text} (default: {shown(action.default)})"


def _family_defaults(name: str) -> str:
    """``(default: adam 0.9, …)``: an optimizer number's default in each family that has it."""
    by_value: dict[float, list[str]] = {}
    for family in optim.FAMILIES:
        values = optim.defaults(family)
        if name in values:
            by_value.setdefault(values[name], []).append(family)
    if len(by_value) == 1:
        return f"(default: {shown(next(iter(by_value)))})"
    parts = [f"{v:g} for {', '.join(fams)}" for v, fams in by_value.items()]
    return f"(default: {'; '.join(parts)})"


def _model_spec(text: str) -> str:
    """``mlp``, ``cnn``, ``PATH.py:CLASS`` (the path made absolute: a resumed run may
    start elsewhere) or ``package.module:CLASS``."""
    if text in model_source.BUILTIN:
        return text
    where, _, name = text.rpartition(":")
    if not where or not name:
        near = difflib.get_close_matches(text, list(model_source.BUILTIN), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise argparse.ArgumentTypeError(f"unknown value {text!r}{hint}; expected mlp, cnn, "
                                         "PATH.py:CLASS or package.module:CLASS")  # fmt: skip
    return f"{Path(where).expanduser().absolute()}:{name}" if where.endswith(".py") else text


def _json_object(text: str) -> dict:
    try:
        value, why = json.loads(text), ""
    except ValueError as e:
        value, why = None, f" ({e})"
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"width\": 64}}', got {text!r}{why}"
        )
    return value


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 500,500, got {text!r}")
    return values


def _cpu_devices(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return n


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _values(text: str) -> list[float]:
    try:
        return sweep.parse_values(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("values: ")) from None


def _multipliers(text: str) -> dict[str, float]:
    out = {}
    for item in _names(text):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected LAYER=FACTOR pairs like output=10,layer_0=0.5, got {item!r}"
            ) from None
    return out


def _add_train_flags(p: argparse.ArgumentParser, number=float) -> None:
    """The flags of ``train``; ``number`` parses the sweepable ones (a list in ``sweep``)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        type=_model_spec,
        default="mlp",
        metavar="MODEL",
        help="mlp, cnn, or a Flax module of your own: PATH.py:CLASS or package.module:CLASS",
    )
    for flag, what in (("--model-args", "arguments (its fields), e.g. '{\"width\": 64}'"),
                       ("--model-numbers", "jaxdl.Hyperparameter values, e.g. '{\"temperature\": 2}'")):  # fmt: skip
        g.add_argument(flag, type=_json_object, default=None, metavar="JSON",
                       help=f"the module's {what}")  # fmt: skip
    g.add_argument(
        "--hidden", type=_ints, default=(500, 500), help="MLP hidden widths, e.g. 500,500"
    )
    g.add_argument("--activation", default="relu", help=f"one of {', '.join(models.ACTIVATIONS)}")
    g.add_argument("--maxout-pieces", type=int, default=2, help="pieces per maxout unit")
    g.add_argument("--init", default="xavier_uniform", help=f"one of {', '.join(inits.NAMES)}")
    g.add_argument(
        "--init-scale",
        type=number,
        default=None,
        help="kernel multiplier (σ for 'normal'; default: the init's own)",
    )
    g.add_argument("--batch-norm", action="store_true", help="batch norm after each hidden layer")
    g.add_argument(
        "--conv-features", type=_ints, default=(32, 64), help="CNN channels per conv block"
    )
    g.add_argument("--conv-kernel", type=int, default=5, help="CNN kernel size")
    g.add_argument(
        "--conv-dense", type=_ints, default=(512,), help="CNN dense widths after the conv blocks"
    )
    g = p.add_argument_group("regularisation")
    g.add_argument(
        "--dropout-input",
        type=number,
        default=None,
        help="dropout rate on the input (CNN: on the conv features); default 0",
    )
    g.add_argument(
        "--dropout-hidden",
        type=number,
        default=None,
        help="dropout rate on each hidden layer (a module of your own: on each "
        "jaxdl.Dropout layer); default 0 (your module's own rates)",
    )
    g.add_argument(
        "--dropout-convention",
        choices=models.CONVENTIONS,
        default="inverted",
        help="scale at train time (inverted) or at test time (classic)",
    )
    g.add_argument("--l1", type=number, default=0.0, help="L1 coefficient on the kernels")
    g.add_argument("--l2", type=number, default=0.0, help="L2 coefficient on the kernels (× Σw²)")
    g.add_argument(
        "--input-noise",
        type=number,
        default=0.0,
        help="σ of Gaussian noise added to training inputs",
    )
    g.add_argument(
        "--early-stopping",
        type=int,
        default=0,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without improvement in --monitor (0: never stop early)",
    )
    g.add_argument(
        "--monitor",
        choices=tuple(stopping.MONITORS),
        default="val_accuracy",
        metavar="METRIC",
        help="the metric that picks the best epoch (and stops early): one of "
        + ", ".join(stopping.MONITORS),
    )
    g.add_argument(
        "--min-delta", type=float, default=0.0, help="smallest change that counts as an improvement"
    )
    g.add_argument(
        "--no-restore-best",
        action="store_true",
        help="keep the last epoch's parameters, not the best epoch's",
    )
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam", help=f"one of {', '.join(optim.FAMILIES)}")
    g.add_argument(
        "--lr", type=number, default=None, help=f"learning rate {_family_defaults('learning_rate')}"
    )
    for name, text in (
        ("momentum", "momentum μ (momentum, momentum_ema, nesterov)"),
        ("b1", "Adam β1"), ("b2", "Adam β2"), ("eps", "ε (adagrad, rmsprop, adam)"),
        ("decay", "RMSProp ρ"), ("weight-decay", "decoupled weight decay on the kernels"),
        ("decay-start-epoch", "epoch from which weight decay applies"),
        ("clip-norm", "clip gradients to this global norm"),
        ("max-norm", "max-norm constraint: each unit's incoming weights kept within this L2 norm"),
        ("lr-decay", "step/plateau decay factor"), ("lr-decay-every", "step schedule period (epochs)"),
        ("lr-patience", "plateau patience (epochs)"), ("warmup-epochs", "warm-up length (epochs)"),
        ("lr-min-ratio", "cosine floor as a fraction of the learning rate"),
    ):  # fmt: skip
        help = f"{text} {_family_defaults(name.replace('-', '_'))}"
        g.add_argument(f"--{name}", type=number, default=None, help=help)
    g.add_argument(
        "--schedule",
        choices=optim.SCHEDULES,
        default="warmup_cosine",
        help="learning-rate schedule (default: warmup_cosine, a cosine from the learning rate "
        "to 0 over --epochs)",
    )
    g.add_argument(
        "--freeze", type=_names, default=(), help="comma-separated layers to freeze, e.g. layer_0"
    )
    g.add_argument(
        "--layer-lr",
        type=_multipliers,
        default={},
        help="per-layer learning-rate multipliers, e.g. output=10,layer_0=0.5",
    )
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=losses.LOSSES, default="cross_entropy", help="data loss")
    g.add_argument("--epochs", type=int, default=20, help="maximum number of epochs")
    g.add_argument("--batch-size", type=int, default=100, help="minibatch size")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed (initialisation, order, dropout)")
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--data",
        default="mnist",
        help="'mnist', or an .npz with x_train, y_train, x_valid, y_valid, x_test, y_test",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data cache (default: $JAXDL_DATA_DIR or ~/.cache/jaxdl)",
    )
    g.add_argument(
        "--preprocess",
        choices=("none", "pixel_mean", "global"),
        default="none",
        help="input standardisation (statistics from the training split)",
    )
    g.add_argument(
        "--train-size", type=int, default=None, help="use only the first N training examples"
    )
    g.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go")
    command = p.prog.split()[-1]
    g.add_argument(
        "--name", default=None, help=f"run directory name (default: {command}-<timestamp>)"
    )
    g.add_argument(
        "--json", action="store_true", help="print a JSON summary as the last line of stdout"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress display")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    g.add_argument(
        "--kernels",
        choices=lowering.KERNELS,
        default="auto",
        help="CPU kernels for the compiled programs: auto (where the CPU has AVX-512 and "
        "they build), on (or fail saying why), off (XLA alone, as on a GPU/TPU); how the "
        "run is computed, not what: a run may resume with another setting",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard event files into the run directory "
        "(needs tensorboardX: pip install 'jaxdl[tensorboard]')",
    )
    g.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="read settings from a TOML or JSON file (a run's config.json reruns it); "
        "flags given on the command line override the file",
    )


def _add_checkpoint_flags(p: argparse.ArgumentParser, *, skip: bool = True) -> None:
    g = p.add_argument_group("checkpoints and faults")
    g.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with the settings of "
        "its config.json (only --json, --no-progress, --no-plots, --data-dir and --kernels "
        "may be given)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="checkpoint every N epochs, at each new best epoch and at the last (0: never)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="K",
        help="keep the K latest checkpoints (and the best one)",
    )
    if skip:
        g.add_argument(
            "--skip-nonfinite",
            action="store_true",
            help="skip optimizer steps whose loss or gradient is NaN/Inf (default: stop the "
            "run at the first one, exit status 3)",
        )
