"""The model of a run as a run records it: a module spec, its arguments and its own
numbers (``ModelConfig``), and the module it builds again."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from jaxdl import contract, model_source
from jaxdl.validate import InputError, unknown

MODULES = model_source.BUILTIN  # jaxdl's own modules, by name


def _frozen(value: Any) -> Any:
    """JSON lists as tuples (hashable module fields, equal after a round trip)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _frozen(v) for k, v in value.items()}
    return value


def module_fields(cls: type[nn.Module]) -> list[str]:
    """The fields a Flax module class takes as arguments (not ``parent``, ``name``)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which module and its arguments (the module's fields). ``module`` is a spec
    (``jaxdl.model_source``): ``"mlp"``, ``"cnn"``, ``"path/to/file.py:Name"`` or
    ``"package.module:Name"``. Without ``num_classes`` in ``args``, ``prepare`` takes it
    from the labels (for a module that has that field)."""

    module: str = "mlp"
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Values of the module's own traced numbers (``jaxdl.Hyperparameter``), by key.
    numbers: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # The class itself when the config was made from a module object (``of``): built
    # again from it in this process, whether or not its spec can be imported.
    cls: type[nn.Module] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "args", _frozen(dict(self.args)))
        object.__setattr__(self, "numbers", dict(self.numbers))

    def module_class(self) -> type[nn.Module]:
        """The Flax module class the config names."""
        if self.cls is not None:
            return self.cls
        if ":" not in self.module and self.module not in MODULES:
            raise unknown("model", self.module, [*MODULES, "PATH.py:CLASS"], "module")
        return model_source.load(self.module)

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The module; ``num_classes`` fills in the class count when ``args`` has none."""
        cls = self.module_class()
        fields = module_fields(cls)
        for key in self.args:
            if key not in fields:
                raise unknown(f"model {self.module}", key, fields, "argument")
        args = dict(self.args)
        if num_classes is not None and "num_classes" in fields:
            args.setdefault("num_classes", num_classes)
        try:
            model = cls(**args)
        except TypeError as e:  # e.g. a required field left out
            raise InputError(f"model {self.module}: {e}") from None
        return contract.check_module(model)

    @classmethod
    def of(cls, model: nn.Module) -> ModelConfig:
        """The config that builds ``model`` again (every field, defaults included)."""
        contract.check_module(model)
        kind = type(model)
        args = {k: getattr(model, k) for k in module_fields(kind)}
        return cls(model_source.spec_of(kind), args, cls=None if kind in MODULES.values() else kind)
