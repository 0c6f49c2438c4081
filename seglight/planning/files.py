"""The plan's files: ``plan.yaml`` (a Hydra config of ordinary overrides), ``plan.json`` (the decisions with their
rules and numbers) and ``fingerprint.json``; and how a plan file is composed over a config.

A plan file is ``# @package _global_`` YAML, like an experiment: ``data.mode``, ``data.patch.size``, ... and a
``plan`` node with the options it was made with (``plan.made`` says from what). It is composed as an option of
the ``plan`` config group: ``plan_overlay`` copies it into a config folder that is added to Hydra's search path,
and selects it, so that every value given on the command line still wins over the plan's; ``plan_arguments``
does that for ``plan=<file>`` among a command line's arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from seglight.core.errors import ConfigError
from seglight.core.io import atomic_path, atomic_write_text
from seglight.planning.fingerprint import Fingerprint
from seglight.planning.planner import Plan

# The plan group's own options (conf/plan/): anything else given as plan=<value> is a plan file.
GROUP_OPTIONS = ("none", "auto", "default")
SOURCE = "source"  # plan.source: the plan file a run was composed with
PLAN_FILE = "plan.yaml"
PLAN_RECORD = "plan.json"
FINGERPRINT_FILE = "fingerprint.json"
PLAN_GROUP = "plan"
PACKAGE_LINE = "# @package _global_"
WIDTH = 110


def nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"data.patch.size": [..]}`` -> ``{"data": {"patch": {"size": [..]}}}``."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def plan_yaml(plan: Plan, made: Mapping[str, Any]) -> str:
    """The plan file: the reasons as comments, then the overrides and the ``plan`` node."""
    lines = [
        PACKAGE_LINE,
        "# A seglight training plan, written by python -m seglight.plan: the values below were decided by the rules",
        "# in these comments (plan.json has them too). Edit freely; any value given on the command line wins.",
    ]
    for decision in plan.decisions:
        keys = ", ".join(decision.overrides) or "(nothing to set)"
        lines += _comment(f"{decision.name} -> {keys}: {decision.rule}")
        lines += _comment(decision.numbers, indent="    ")
    for risk in plan.risks:
        lines += _comment(f"warning: {risk}")
    body = {**nested(plan.overrides()), PLAN_GROUP: {**plan.settings, "made": dict(made)}}
    text = yaml.dump(body, Dumper=_PlanDumper, sort_keys=False, width=WIDTH, allow_unicode=True)
    return "\n".join(lines) + "\n" + text


class _PlanDumper(yaml.SafeDumper):
    """YAML with sizes, spacings and kernels on one line each (``size: [96, 96, 48]``)."""


def _flow_lists(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_PlanDumper.add_representer(list, _flow_lists)


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"# {indent}", subsequent_indent=f"# {indent}  ")


def write_plan_files(
    folder: str | Path, plan: Plan, fingerprint: Fingerprint, made: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``plan.yaml``, ``plan.json`` and ``fingerprint.json`` into ``folder`` (atomically); their paths."""
    folder = Path(folder)
    paths = {name: folder / name for name in (PLAN_FILE, PLAN_RECORD, FINGERPRINT_FILE)}
    atomic_write_text(paths[FINGERPRINT_FILE], json.dumps(fingerprint.to_dict(), indent=1))
    atomic_write_text(
        paths[PLAN_RECORD], json.dumps({**plan.to_dict(), "made": dict(made)}, indent=1, default=str)
    )
    atomic_write_text(paths[PLAN_FILE], plan_yaml(plan, made))
    return paths


def read_plan(path: str | Path) -> dict[str, Any]:
    """A plan file's values (nested), after checking that it is one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"plan file {path}: not found (python -m seglight.plan writes plan.yaml into its run folder)"
        )
    text = path.read_text()
    if not text.lstrip().startswith(PACKAGE_LINE):
        raise ConfigError(
            f"plan file {path}: does not start with '{PACKAGE_LINE}', so it is not a seglight plan"
        )
    try:
        values = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as exc:  # OmegaConf and YAML raise several types
        raise ConfigError(f"plan file {path}: not readable YAML ({exc})") from exc
    if not isinstance(values, dict) or PLAN_GROUP not in values:
        raise ConfigError(f"plan file {path}: has no '{PLAN_GROUP}' section, so it is not a seglight plan")
    return values


def plan_overlay(path: str | Path, config_dir: str | Path) -> list[str]:
    """Hydra overrides that compose the plan file at ``path`` over a config (``train.yaml``): the file is copied
    into ``config_dir/plan/`` under a name from its content, that folder is added to the search path, the copy
    is selected as the ``plan`` option, and ``plan.source`` names the file.

    Values given on the command line still win over the plan's (Hydra applies them after the defaults list).
    """
    path = Path(path).expanduser().resolve()
    read_plan(path)
    name = "file_" + hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    target = Path(config_dir).resolve() / PLAN_GROUP / f"{name}.yaml"
    if not target.is_file():
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
    source = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return [
        f"hydra.searchpath=[file://{target.parent.parent}]",
        f"{PLAN_GROUP}={name}",
        f"+{PLAN_GROUP}.{SOURCE}='{source}'",
    ]


def plan_arguments(arguments: Sequence[str], config_dir: str | Path) -> list[str]:
    """Command-line arguments with ``plan=<file>`` replaced by the overrides that compose that file
    (``plan_overlay``); ``plan=auto``, ``plan=none`` and every other argument stay as they are."""
    result: list[str] = []
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if sep and key == PLAN_GROUP and is_plan_file(value):
            result += plan_overlay(value, config_dir)
        else:
            result.append(argument)
    return result


def is_plan_file(value: str) -> bool:
    """Whether a ``plan=`` value names a file rather than an option of the group (``none``, ``auto``)."""
    value = value.strip().strip("'\"")
    if not value or value in GROUP_OPTIONS or value.startswith("file_"):
        return False
    return value.endswith((".yaml", ".yml")) or "/" in value or os.sep in value or Path(value).is_file()


def applied_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """A plan file's values as dotted overrides (``data.patch.size``), its ``plan`` node left out."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", {k: v for k, v in values.items() if k != PLAN_GROUP})
    return flat


def plan_record(node: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a planned run saves with its model, from its ``plan`` config node once the plan was applied: the
    options, where the plan came from (``source``, ``made``), the overrides applied and those the command line
    overrode. None for a run without a plan."""
    if not node or "applied" not in node:
        return None
    return {k: v for k, v in node.items() if k not in ("given", "auto")}
