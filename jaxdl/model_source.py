"""Where a model class comes from: a name a run records, and the class it names again.

A model is named by a *spec*: ``"mlp"`` or ``"cnn"`` (jaxdl's), ``"path/to/file.py:Name"``
(a class in a Python file) or ``"package.module:Name"`` (a class in an importable
module). ``spec_of`` gives the spec of a class; ``load`` gives the class of a spec;
``source`` the text a run directory keeps of a file's class, with its sha256, so a
resumed run can refuse a model whose code changed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from flax import linen as nn

from jaxdl import models
from jaxdl.validate import InputError

BUILTIN: dict[str, type[nn.Module]] = {"mlp": models.MLP, "cnn": models.CNN}


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a class in a Python file (``path.py:Name``)."""
    return spec.rpartition(":")[0].endswith(".py")


def _split(spec: str) -> tuple[str, str]:
    where, _, name = spec.rpartition(":")
    if not where or not name or not name.replace("_", "a").replace(".", "a").isalnum():
        raise InputError(
            f"model {spec!r}: expected mlp, cnn, PATH.py:CLASS or package.module:CLASS"
        )
    return where, name


def load(spec: str) -> type[nn.Module]:
    """The Flax module class ``spec`` names (see the module docstring)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    where, name = _split(spec)
    if is_file_spec(spec):
        path = Path(where).expanduser()
        if not path.is_file():
            raise InputError(f"model {spec!r}: no such file {str(path)!r}")
        module = _import_file(str(path.resolve()), source(spec)[1])
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise InputError(f"model {spec!r}: cannot import {where!r} ({e})") from None
    cls = module
    for part in name.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            found = sorted(
                k for k, v in vars(module).items()
                if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__
            )  # fmt: skip
            have = ", ".join(found) or "no flax.linen.Module classes"
            raise InputError(f"model {spec!r}: {where} has no {name!r} (it has {have})")
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise InputError(f"model {spec!r}: expected a flax.linen.Module class, got {cls!r}")
    return cls


@functools.lru_cache(maxsize=32)
def _import_file(path: str, digest: str):
    """The module of the file at ``path`` (once per content: an edited file is new)."""
    name = f"jaxdl_model_{Path(path).stem}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flax and dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise InputError(f"model file {path!r}: {type(e).__name__}: {e}") from None
    return module


def source(spec: str) -> tuple[str, str]:
    """(text, sha256 hex) of the file a ``path.py:Name`` spec names."""
    path = Path(spec.rpartition(":")[0]).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"model {spec!r}: cannot read {str(path)!r} ({e.strerror})") from None
    return text, hashlib.sha256(text.encode()).hexdigest()


def spec_of(cls: type[nn.Module]) -> str:
    """A spec that names ``cls`` again: jaxdl's name, ``package.module:Name`` for an
    importable class, else ``path.py:Name`` for a class defined in a script or file."""
    for name, c in BUILTIN.items():
        if cls is c:
            return name
    module = cls.__module__
    if module != "__main__" and not module.startswith("jaxdl_model_"):
        return f"{module}:{cls.__qualname__}"
    try:
        return f"{Path(inspect.getsourcefile(cls)).resolve()}:{cls.__qualname__}"
    except (TypeError, OSError):  # defined in a notebook or at a prompt: no file
        return f"{module}:{cls.__qualname__}"
