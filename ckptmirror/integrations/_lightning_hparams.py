"""Hyper-parameters of a Lightning checkpoint made storable (JSON-able forms, no pickle).

Part of :mod:`ckptmirror.integrations.lightning`: :func:`storable_hparams` converts the
types a ``save_hyperparameters()`` call commonly records (Namespace, Path, Enum, dataclasses,
named tuples, sets, OmegaConf containers) and refuses the others with the key path and how to
leave them out. Nothing here imports Lightning.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedTypeError

#: Checkpoint entries holding hyper-parameters (LightningModule and LightningDataModule), converted
#: by :func:`storable_hparams`, and those holding the class of an OmegaConf hparams container.
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
HPARAMS_TYPE_KEYS = ("hparams_type", "datamodule_hparams_type")


def storable_hparams(value: Any, path: str = "checkpoint['hyper_parameters']", ignore_hint: str = "") -> Any:
    """``value`` with the types ckptmirror cannot store converted to JSON-able forms, recursively.

    ``argparse.Namespace`` -> dict of its attributes; ``os.PathLike`` (``pathlib.Path``) -> str;
    ``enum.Enum`` -> its value (converted in turn); a dataclass instance -> dict of its fields; a
    named tuple -> dict; ``set``/``frozenset`` -> list (sorted when its items sort); an OmegaConf
    ``DictConfig``/``ListConfig`` -> plain dict/list (interpolations resolved); dict keys of those
    kinds are converted the same way. Tensors, arrays, numbers, strings, bytes, None, dtypes and
    devices stay (ckptmirror stores them). Anything else raises
    :class:`~ckptmirror.UnsupportedTypeError` naming its key path, with ``ignore_hint`` appended
    (how to leave it out). Conversions are one way: a Namespace comes back as a dict.
    """
    return _Converter(ignore_hint).conv(value, path, 0)


class _Converter:
    """One :func:`storable_hparams` call (the hint is built once, the depth is bounded)."""

    MAX_DEPTH = 100

    def __init__(self, ignore_hint: str) -> None:
        self.ignore_hint = ignore_hint

    def conv(self, obj: Any, path: str, depth: int) -> Any:
        if depth > self.MAX_DEPTH:
            raise UnsupportedTypeError(path, type(obj), f"nested deeper than {self.MAX_DEPTH}")
        if obj is None or isinstance(obj, (bool, str, bytes, float, torch.Tensor, torch.dtype, torch.device)):
            return obj
        if isinstance(obj, enum.Enum):  # before int: IntEnum/IntFlag are ints too
            return self.conv(obj.value, path, depth + 1)
        if isinstance(obj, int):
            return obj
        if type(obj).__module__.startswith("numpy"):
            return obj  # arrays and scalars: ckptmirror stores them (object dtypes are refused there)
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, argparse.Namespace):
            return self.conv(vars(obj), path, depth)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return self.conv(fields, path, depth)
        if type(obj).__module__.startswith("omegaconf"):
            # An OmegaConf DictConfig/ListConfig (Hydra configs): omegaconf is imported since obj exists.
            omegaconf = sys.modules["omegaconf"]
            return self.conv(omegaconf.OmegaConf.to_container(obj, resolve=True), path, depth)
        if isinstance(obj, Mapping):
            out: dict[Any, Any] = {}
            for k, v in obj.items():
                key = self.conv_key(k, path)
                out[key] = self.conv(v, f"{path}[{k!r}]", depth + 1)
            return out
        if isinstance(obj, tuple) and hasattr(obj, "_asdict"):  # a named tuple
            return self.conv(dict(obj._asdict()), path, depth)
        if type(obj) in (list, tuple):
            items = [self.conv(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
            return items if type(obj) is list else tuple(items)
        if isinstance(obj, (set, frozenset)):
            items = list(obj)
            try:
                items.sort()
            except TypeError:
                pass  # mixed types: iteration order
            return [self.conv(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(items)]
        raise UnsupportedTypeError(path, type(obj), self.hint())

    def conv_key(self, k: Any, path: str) -> Any:
        if k is None or isinstance(k, (str, int, float, bool)) and not isinstance(k, enum.Enum):
            return k
        if isinstance(k, enum.Enum):
            return self.conv_key(k.value, path)
        if isinstance(k, os.PathLike):
            return os.fspath(k)
        raise UnsupportedTypeError(f"{path} key {k!r}", type(k), "dict keys must be str, int, float, bool or None")

    def hint(self) -> str:
        extra = f"; {self.ignore_hint}" if self.ignore_hint else ""
        return (
            "hyper-parameters are stored as JSON-able values: Namespace, Path, Enum, dataclasses, named tuples, sets "
            f"and OmegaConf containers are converted, other objects are not{extra}"
        )


def _convert_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` whose hyper-parameter entries are storable (module doc)."""
    out = dict(checkpoint)
    for key in HPARAMS_KEYS:
        if key in out:
            owner = "self" if key == "hyper_parameters" else "your LightningDataModule's self"
            out[key] = _convert_hparams(out[key], key, owner)
    for key in HPARAMS_TYPE_KEYS:
        t = out.get(key)
        if isinstance(t, type):  # Lightning reads a str here as AttributeDict (saving._convert_loaded_hparams)
            out[key] = f"{t.__module__}.{t.__qualname__}"
    return out


def _convert_hparams(hparams: Any, key: str, owner: str) -> Any:
    """Convert one hyper-parameters entry; the error names the top-level name to ignore."""
    root = f"checkpoint[{key!r}]"
    if isinstance(hparams, Mapping) and not type(hparams).__module__.startswith("omegaconf"):
        out: dict[Any, Any] = {}
        for name, v in hparams.items():
            hint = f"leave it out with {owner}.save_hyperparameters(ignore=[{name!r}]) or pass a plain value"
            out[name] = storable_hparams(v, f"{root}[{name!r}]", hint)
        return out
    return storable_hparams(hparams, root, f"leave it out with {owner}.save_hyperparameters(ignore=[...])")
