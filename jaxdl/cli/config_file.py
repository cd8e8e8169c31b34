"""``--config FILE``: settings from a file, read as the flags they stand for.

Every run directory holds ``config.json``: the command, the run's ``RunConfig``
(``jaxdl.config``) under ``"run"``, its other flags under ``"options"`` (a sweep's
values under ``"space"``) and a few keys kept for the record (``resolved``, ``run_dir``).
``jaxdl train --config runs/NAME/config.json`` reruns it; a hand-written TOML or JSON
file holds flags by name (their ``dest``, e.g. ``batch_size``, or their spelling):

.. code-block:: toml

    hidden = [256, 256]       # or "256,256", as on the command line
    dropout-hidden = 0.5      # flag spelling works too
    optimizer = "momentum"
    momentum = 0.9
    epochs = 30

Values are read exactly as the flag's text would be (a list becomes ``a,b,c``), so a
file accepts whatever the flag accepts. Flags given on the command line override the
file. An unknown key is an error naming the key and the nearest valid one. The run
directory's name is never taken from a saved ``config.json``: a rerun gets a new one.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdl.config import MODEL_FLAGS, RECORD_KEYS, saved_flags
from jaxdl.validate import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# Where a sweep runs: a resumed run may name other processes and devices (they compute
# the same rows; a checkpoint's padding must fit the devices, see ``Checkpointer.check``).
PLACEMENT = ("processes", "coordinator", "num_processes", "process_id", "launched", "cpu_devices")
# Not settings of the run: where its settings came from, its directory's name, and how
# this invocation's processes met (--cpu-devices is kept: a resumed run reuses it).
NOT_SAVED = ("config", "name", *(k for k in PLACEMENT if k != "cpu_devices"))


# Names a Python user knows (RunConfig's, the modules' fields) and the flag for each.
_PYTHON_NAMES = {"learning_rate": "lr", "dropout": "dropout_hidden", "patience": "early_stopping",
                 **{field: flag for flag, field in MODEL_FLAGS.items() if field != flag}}  # fmt: skip


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """The settings to save in ``config.json``: every parsed flag (paths as text),
    except ``--config`` and ``--name``, plus ``command``."""
    return {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in NOT_SAVED
    }


def load(path: str | Path) -> dict[str, Any]:
    """Reads a TOML (``.toml``) or JSON (any other suffix) file holding one table/object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--config: cannot read {str(path)!r} ({e.strerror or e})") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--config {path}: not valid {kind}: {first}") from None
    if not isinstance(values, dict):
        raise InputError(
            f"--config {path}: expected a table of settings, got {type(values).__name__}"
        )
    return values


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # argparse has no public accessor for a parser's actions; ``_actions`` has been stable
    # since argparse entered the standard library.
    return {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in (argparse.SUPPRESS, "help", *NOT_SAVED)
    }


def _as_text(value: Any, where: str) -> str:
    """The command-line text a file value stands for: lists join with commas."""
    if isinstance(value, bool):
        raise InputError(f"{where}: expected a value for the flag, got {value!r}")
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(v, where) for v in value)
    if isinstance(value, Mapping):
        return ",".join(f"{k}={_as_text(v, where)}" for k, v in value.items())
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    if isinstance(value, (int, str)):
        return str(value)
    raise InputError(f"{where}: unsupported value {value!r}")


_EXPECTED = {int: "an integer", float: "a number", Path: "a path"}


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """Parses one file value as argparse would parse the flag's text."""
    if value is None:
        if action.default is None:
            return None
        raise InputError(f"{where}: expected a value, got null")
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    text = _as_text(value, where)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except argparse.ArgumentTypeError as e:
            raise InputError(f"{where}: {e}") from None
        except (TypeError, ValueError):
            expected = _EXPECTED.get(action.type, "a valid value")
            raise InputError(f"{where}: expected {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        near = difflib.get_close_matches(str(converted), [str(c) for c in action.choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InputError(
            f"{where}: unknown value {converted!r}{hint}; expected one of "
            f"{', '.join(map(str, action.choices))}"
        )
    return converted


def defaults(
    parser: argparse.ArgumentParser, values: Mapping[str, Any], *, command: str, source: str
) -> dict[str, Any]:
    """Checks a config's keys and values against ``parser`` (one command's) and returns
    them parsed, keyed by ``dest``, ready for ``parser.set_defaults``.

    Keys may be spelled like the flag (``batch-size``) or its dest (``batch_size``).
    Raises ``InputError`` naming the file and key for an unknown key (with the nearest
    valid one), a bad value, a key given twice, or a config written by another command.
    """
    actions = _flag_actions(parser)
    if isinstance(values.get("run"), Mapping):  # a run's config.json: its flag-named view,
        values = {k: v for k, v in saved_flags(values).items()  # less what has no flag here
                  if k in actions or k in RECORD_KEYS}  # fmt: skip
    written_by = values.get("command")
    if written_by is not None and written_by != command:
        raise InputError(
            f"--config {source}: written by 'jaxdl {written_by}'; use it with that command, "
            f"not 'jaxdl {command}'"
        )
    out: dict[str, Any] = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest in RECORD_KEYS:
            continue
        if dest == "name":  # a hand-written file may name its run directory; a run's
            if written_by is None:  # own config.json (older ones held its name) may not
                out[dest] = _as_text(value, f"--config {source}: {key}")
            continue
        action = actions.get(dest)
        if action is None:
            valid = sorted(actions) + ["name"]
            near = [_PYTHON_NAMES[dest]] if dest in _PYTHON_NAMES else []
            near = near or difflib.get_close_matches(dest, valid, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"--config {source}: unknown key {key!r} for jaxdl {command}{hint}")
        if dest in out:
            raise InputError(f"--config {source}: {key!r} is given twice")
        out[dest] = _convert(action, value, f"--config {source}: {key}")
    return out


def reparse(
    parser: argparse.ArgumentParser,
    command_parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    a: argparse.Namespace,
) -> argparse.Namespace:
    """Parses ``argv`` again with the file named by ``a.config`` as defaults, so flags on
    the command line override the file and the parser's defaults fill the rest."""
    values = load(a.config)
    command_parser.set_defaults(
        **defaults(command_parser, values, command=a.command, source=str(a.config))
    )
    return parser.parse_args(argv)
