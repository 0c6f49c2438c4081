"""SageMaker hyperparameters -> Hydra overrides.

The training toolkit starts the entry point with ``--name value`` pairs, one per hyperparameter, each value
the ``str()`` of what the SageMaker Python SDK JSON-encoded: ``--lr 0.0001``, ``--amp True``,
``--data.spatial_size [96, 96, 64]``, ``--data.image_key ['t1', 't2']``, a dict as ``k1=v1,k2=v2``. Under
SageMaker's PyTorch container the command line also passes through a shell, which splits values at spaces
(``[96,`` ``96,`` ``64]``). Both forms are read back here into values, then written as Hydra overrides.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from seglight.core.errors import ConfigError

# The lab's hyperparameters (its train_simple.py) and the seglight option each one sets.
LAB_OPTIONS = {
    "model_name": "model",
    "epochs": "trainer.max_epochs",
    "batch_size": "data.batch_size",
    "lr": "optimizer.lr",
    "val_interval": "trainer.check_val_every_n_epoch",
    "amp": "trainer.precision",
}
_NAME = re.compile(r"--(?P<long>[^\s=]+)|-(?P<short>[A-Za-z_])")
_TOOLKIT_DICT = re.compile(r"[^=,\s]+=[^=,]*(,[^=,\s]+=[^=,]*)*")
_PARSER = OverridesParser.create()


@dataclass
class Hyperparameters:
    """The job's hyperparameters, split into the lab's names, config group choices and dotted options."""

    lab: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def parse_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """``--name value ...`` as the training toolkit passes hyperparameters -> ``{name: value}``.

    Tokens up to the next ``--name`` are joined with a space, which undoes a shell's splitting of
    ``[96, 96, 64]``; each value is then read as JSON, a Python literal, the toolkit's ``k=v,k=v`` form of a
    dict, or Hydra's value syntax, in that order, and otherwise kept as text.
    """
    collected: dict[str, list[str]] = {}
    name: str | None = None
    for token in argv:
        match = _NAME.fullmatch(token)
        if match:
            name = match.group("long") or match.group("short")
            if name in collected:
                raise ConfigError(f"hyperparameter {name} is given twice")
            collected[name] = []
        elif name is None:
            raise ConfigError(
                f"argument {token!r}: expected --<hyperparameter> <value> pairs, as SageMaker passes them"
            )
        else:
            collected[name].append(token)
    return {key: parse_value(" ".join(parts)) for key, parts in collected.items()}


def parse_value(text: str) -> Any:
    """One hyperparameter value from its text (see ``parse_arguments``); an empty text is None."""
    text = text.strip()
    if not text:
        return None  # the toolkit's rendering of None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text)  # Python's str() of a list of strings or of True/False
        if isinstance(value, bool | int | float | str | list | tuple | dict):
            return list(value) if isinstance(value, tuple) else value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if _TOOLKIT_DICT.fullmatch(text):
        pairs = (item.split("=", 1) for item in text.split(","))
        return {key.strip(): parse_value(value) for key, value in pairs}
    try:
        override = _PARSER.parse_override(f"value={text}")
    except Exception:
        return text
    if override.is_sweep_override():
        return list(getattr(override.value(), "list", [text]))  # top-level commas: a list, not a sweep
    return override.value()


def hydra_value(value: Any) -> str:
    """``value`` written in Hydra's override syntax, so that Hydra reads back the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_dict_key(k)}: {hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _reads_back(text, text):
        return text
    quoted = "'" + text.replace("'", "\\'") + "'"
    if not _reads_back(quoted, text):
        raise ConfigError(f"value {text!r} cannot be passed on to seglight as an option")
    return quoted


def override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's syntax."""
    return f"{key}={hydra_value(value)}"


def split_hyperparameters(values: Mapping[str, Any], groups: Iterable[str]) -> Hyperparameters:
    """Sort hyperparameters into the lab's names, config group choices (``model``, ``experiment``...) and options."""
    groups = set(groups)
    split = Hyperparameters()
    for name, value in values.items():
        if name in LAB_OPTIONS:
            split.lab[name] = value
        elif name in groups:
            split.groups[name] = value
        else:
            split.options[name] = value
    for name in split.lab:
        target = LAB_OPTIONS[name]
        clash = target if target in split.options else target if target in split.groups else None
        if clash:
            raise ConfigError(f"hyperparameters {name} and {clash} both set {target}: keep one")
    return split


def lab_settings(lab: Mapping[str, Any]) -> dict[str, Any]:
    """The seglight options the lab's hyperparameters set (``model_name`` aside), checked for type."""
    settings: dict[str, Any] = {}
    for name in ("epochs", "batch_size", "val_interval"):
        if name in lab:
            settings[LAB_OPTIONS[name]] = _whole_number(name, lab[name])
    if "lr" in lab:
        lr = lab["lr"]
        if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
            raise ConfigError(f"hyperparameter lr={lr!r}: expected a positive number, e.g. 0.0001")
        settings["optimizer.lr"] = float(lr)
    if "amp" in lab:
        amp = lab["amp"]
        if not isinstance(amp, bool):
            raise ConfigError(f"hyperparameter amp={amp!r}: expected true or false")
        settings["trainer.precision"] = "16-mixed" if amp else "32"
    return settings


@dataclass(frozen=True)
class ModelChoice:
    """``model_name`` resolved: a seglight model option, or another class of ``monai.networks.nets``."""

    option: str | None = None
    target: str | None = None


def choose_model(name: Any, options: Sequence[str], monai_nets: Any) -> ModelChoice:
    """``SegResNet``, ``segresnet`` or ``monai.networks.nets.SegResNet`` -> the seglight option ``segresnet``.

    A MONAI class without a seglight config (``BasicUNet``, ``AttentionUnet``...) is used by ``_target_``.
    """
    text = str(name).strip()
    short = text.rsplit(".", 1)[-1]
    for option in options:
        if option.lower() == short.lower():
            return ModelChoice(option=option)
    if short and inspect.isclass(getattr(monai_nets, short, None)):
        return ModelChoice(target=f"{monai_nets.__name__}.{short}")
    raise ConfigError(
        f"hyperparameter model_name={text}: not a seglight model ({', '.join(options)}) nor a class of "
        "monai.networks.nets (e.g. SegResNet, UNet, SwinUNETR, DynUNet, UNETR, BasicUNet)"
    )


def network_arguments(target_class: type) -> tuple[set[str], set[str]]:
    """(every constructor argument, the ones without a default) of a network class."""
    parameters = list(inspect.signature(target_class.__init__).parameters.values())[1:]
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return {p.name for p in named}, {p.name for p in named if p.default is p.empty}


def config_keys(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Every dotted key of a nested config (inner nodes included): the options one can override."""
    keys: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, Mapping):
            keys |= config_keys(value, f"{path}.")
    return keys


def check_names(unknown: Sequence[str], config: Mapping[str, Any], groups: Iterable[str]) -> None:
    """Stop with one line naming the unknown hyperparameters and the accepted names."""
    if not unknown:
        return
    known = sorted(config_keys(config))
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name.lstrip("+"), [*LAB_OPTIONS, *known], n=1, cutoff=0.75)
        if close:
            hints.append(f"{name} -> {close[0]}?")
    groups = sorted(groups)
    sections = [k for k, v in config.items() if isinstance(v, Mapping) and k != "hydra"]
    top = [k for k, v in config.items() if not isinstance(v, Mapping) and k not in groups]
    raise ConfigError(
        f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
        + (f" (did you mean {', '.join(hints)})" if hints else "")
        + f". Accepted: the lab's {', '.join(LAB_OPTIONS)}; a config group ({', '.join(groups)}); "
        f"{', '.join(top)}; or any seglight option by its command-line name under "
        f"{', '.join(s + '.' for s in sections)} (e.g. data.spatial_size, trainer.precision)"
    )


def _whole_number(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"hyperparameter {name}={value!r}: expected a whole number of at least 1")
    return value


def _dict_key(key: Any) -> str:
    text = str(key)
    if not re.fullmatch(r"[\w\-]+", text):
        raise ConfigError(f"dict key {text!r} cannot be passed on to seglight as an option")
    return text


def _reads_back(text: str, expected: str) -> bool:
    try:
        parsed = _PARSER.parse_override(f"value={text}")
    except Exception:
        return False
    return not parsed.is_sweep_override() and parsed.value() == expected
