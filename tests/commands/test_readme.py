"""Every command line the README shows composes: its config groups, options and keys exist, with real Hydra.

Running them all would need the users' data; composing them catches what a renamed key or moved option breaks.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

REPO = Path(__file__).resolve().parents[2]
COMMAND = re.compile(r"(?:^|\s)python -m seglight\.(\w+)((?:[^\n\\#`]|\\\n)*)")
# Placeholders the README writes in angle brackets, and values that compose in their place.
PLACEHOLDERS = {
    "<run folder>": "/tmp/run",
    "<file or run folder>": "/tmp/run/last.ckpt",
    "<checkpoint>": "x.ckpt",
}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command, overrides) of every ``python -m seglight.<command> ...`` in the README's code blocks."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```[\w-]*\n(.*?)```", text, re.S)
    found = []
    for block in blocks:
        for match in COMMAND.finditer(block):
            line = match.group(2).replace("\\\n", " ")
            for placeholder, value in PLACEHOLDERS.items():
                line = line.replace(placeholder, value)
            line = re.sub(r"<[^>]*>", "x", line)  # any other placeholder (<run>, <sweep>...) inside a value
            words = [w for w in shlex.split(line) if w not in ("-m", "--multirun")]
            found.append((match.group(1), words))
    return found


COMMANDS = readme_commands()


def as_single_run(words: list[str]) -> list[str]:
    """Overrides as one run composes them: a sweep's first value, Hydra's own settings and ``...`` left out."""
    overrides = []
    for word in words:
        if word.startswith("hydra") or "=" not in word or word.endswith("=..."):
            continue
        key, value = word.split("=", 1)
        if key == "plan" and value.endswith((".yaml", ".yml")):
            continue  # a saved plan file: tests/commands/test_plan.py composes real ones
        if "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]  # a multirun's grid: each value composes alike
        overrides.append(f"{key}={value}")
    return overrides


def test_the_readme_shows_the_commands() -> None:
    assert {name for name, _ in COMMANDS} >= {
        "train",
        "predict",
        "evaluate",
        "check",
        "viz",
        "export",
        "cache",
    }
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("command", "words"), COMMANDS, ids=[" ".join([c, *w])[:80] for c, w in COMMANDS])
def test_each_readme_command_line_composes(command: str, words: list[str]) -> None:
    overrides = as_single_run(words)
    if command == "cache":
        overrides = [w for w in overrides if "=" in w] + [f"action={w}" for w in words if "=" not in w]
    with initialize_config_module(config_module="seglight.conf", version_base="1.3"):
        cfg = compose(config_name=command, overrides=overrides)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "/" not in key and override[0] != "~" and "." in key:
            node, leaf = key.rsplit(".", 1)
            parent = cfg
            for part in node.split("."):
                parent = parent[part]
            assert leaf in parent, f"{override}: {key} is not in the composed {command} config"
