"""The package's shape: commands on top and one sub-package per concern, imports that run one way (no cycle; the
LightningModule does not depend on prediction), modules and classes small enough to read, no private name used
across packages, and each concern that used to be duplicated in one place."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seglight"
# The layers, top first: a package imports only packages after it (commands: the modules at the top of seglight).
LAYERS = (
    "sagemaker",  # SageMaker's entry point runs the train command
    "commands",
    "config",
    "evaluation",
    "exporting",
    "planning",
    "prediction",
    "training",
    "visualization",
    "data",
    "models",
    "core",
)
COMMANDS = ("train", "predict", "evaluate", "check", "viz", "export", "cache", "plan")
# No library module longer than this, no class longer than CLASS_LINES; a command stays a thin Hydra app.
MODULE_LINES, CLASS_LINES, COMMAND_LINES = 500, 320, 120


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# What the LightningModule must work without: a module that imports any of these depends on prediction.
PREDICTION_SIDE = tuple(
    name
    for name in SOURCES
    if name.split(".")[1:2] in (["prediction"], ["evaluation"], ["visualization"], ["config"])
    or name in ("seglight.predict", "seglight.evaluate", "seglight.viz")
)


def package_of(name: str) -> str:
    """The layer a module belongs to: its sub-package, or ``commands`` for the modules at the top."""
    parts = name.split(".")
    if len(parts) == 1:
        return "commands"  # seglight/__init__.py: the lazy public names
    return "commands" if len(parts) == 2 and parts[1] in COMMANDS else parts[1]


def imported_modules(name: str) -> set[str]:
    """seglight modules that ``name`` imports anywhere in its code, inside functions too (not for type checking)."""
    tree = ast.parse(SOURCES[name].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in SOURCES and m != name}


GRAPH = {name: imported_modules(name) for name in SOURCES}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    order: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        done.add(node)
        for other in sorted(graph[node]):
            visit(other)
        order.append(node)

    for node in sorted(graph):
        visit(node)
    return order


def test_imports_run_one_way() -> None:
    assert cycle(GRAPH) is None, " -> ".join(cycle(GRAPH) or [])
    reachable: set[str] = set()
    pending = ["seglight.training.module"]
    while pending:
        for other in GRAPH[pending.pop()] - reachable:
            reachable.add(other)
            pending.append(other)
    assert not reachable & set(PREDICTION_SIDE), sorted(reachable & set(PREDICTION_SIDE))


def test_commands_are_on_top_and_every_library_module_is_in_a_sub_package() -> None:
    top = {
        name.split(".")[1]
        for name in SOURCES
        if name.count(".") == 1 and not (PACKAGE / name.split(".")[1]).is_dir()
    }
    assert top == set(COMMANDS) & top and top >= {
        "train",
        "predict",
        "evaluate",
        "check",
        "viz",
        "export",
        "cache",
    }
    assert {package_of(name) for name in SOURCES} <= set(LAYERS), sorted(
        {package_of(n) for n in SOURCES} - set(LAYERS)
    )


def test_packages_import_only_the_layers_below_them() -> None:
    wrong = [
        f"{name} -> {other}"
        for name, others in GRAPH.items()
        for other in others
        if LAYERS.index(package_of(other)) < LAYERS.index(package_of(name))
    ]
    assert not wrong, wrong


def test_no_private_name_is_imported_from_another_package() -> None:
    wrong = []
    for name, path in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seglight"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                if private and package_of(node.module) != package_of(name):
                    wrong.append(f"{name}: from {node.module} import {', '.join(private)}")
    assert not wrong, wrong


def test_modules_and_classes_are_small_enough_to_read() -> None:
    long_modules, long_classes = {}, {}
    for name, path in SOURCES.items():
        text = path.read_text()
        limit = COMMAND_LINES if package_of(name) == "commands" else MODULE_LINES
        if len(text.splitlines()) > limit:
            long_modules[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                long_classes[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long_modules and not long_classes, (long_modules, long_classes)


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter() -> None:
    order = dependency_order(GRAPH)
    code = (
        "import importlib, json, sys\n"
        "import seglight.training.module\n"
        "after_module = sorted(m for m in sys.modules if m.startswith('seglight'))\n"
        f"for name in {order!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(after_module))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "seglight.training.module" in loaded and not loaded & set(PREDICTION_SIDE), sorted(loaded)


@functools.cache
def definitions() -> dict[str, list[str]]:
    """Top-level function, class and constant names -> the modules that define them."""
    found: dict[str, list[str]] = {}
    for name, path in SOURCES.items():
        for node in ast.parse(path.read_text()).body:
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for defined in names:
                found.setdefault(defined, []).append(name)
    return found


@pytest.mark.parametrize(
    ("helper", "home"),
    [
        ("safe_load", "seglight.training.checkpoints"),
        ("load_nifti", "seglight.core.io"),
        ("NIFTI_SUFFIXES", "seglight.core.io"),
        ("atomic_write_text", "seglight.core.io"),
        ("atomic_path", "seglight.core.io"),
        ("spacing_from_affine", "seglight.core.geometry"),
        ("plain", "seglight.core.containers"),
        ("hd95_mm", "seglight.models.metrics"),
        ("predict_volume", "seglight.prediction.predictor"),
        ("DEFAULT_SPATIAL_SIZE", "seglight.data.transforms"),
        ("describe_transform", "seglight.data.transforms"),
        ("pipeline_settings", "seglight.data.transforms"),
        ("load_module", "seglight.prediction.models"),
        ("DEFAULT_PATCH", "seglight.data.settings"),
        ("DEFAULT_INFERENCE", "seglight.training.module"),
        ("DEFAULT_COMPUTE", "seglight.models.networks"),
        ("DEFAULT_NET", "seglight.models.networks"),
        ("build_network", "seglight.models.networks"),
        ("DEFAULT_LOSS", "seglight.models.losses"),
        ("loss_for_task", "seglight.models.losses"),
        ("build_optimizer", "seglight.training.optim"),
        ("schedule_config", "seglight.training.optim"),
        ("RunSummary", "seglight.training.summary"),
        ("best_else_last", "seglight.training.checkpoints"),
        ("validation_due", "seglight.training.module"),
        ("is_placeholder", "seglight.data.sampling"),
    ],
)
def test_each_helper_is_defined_once(helper: str, home: str) -> None:
    assert definitions().get(helper) == [home]


def test_the_old_duplicates_are_gone() -> None:
    names = definitions()
    for gone in (
        "_plain",
        "voxel_spacing",
        "_spacing",
        "predicted_labels",
        "activate",
        "NIFTI_ENDINGS",
        "model_source",
        "SCHEDULE_KEYS",
        "_read_json",
    ):
        assert gone not in names, (gone, names.get(gone))
    methods = {
        node.name
        for node in ast.walk(ast.parse(SOURCES["seglight.training.module"].read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    assert {"probabilities", "labels"} <= methods
    assert not methods & {"binarize", "one_hot", "labels_from_logits", "predict_volume"}


@functools.cache
def calls(name: str) -> set[str]:
    """The functions ``name`` calls, as written (``torch.load``, ``nib.save``...)."""
    tree = ast.parse(SOURCES[name].read_text())
    return {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}


@pytest.mark.parametrize(
    ("function", "allowed"),
    [
        ("nib.load", {"seglight.core.io"}),  # the one NIfTI loader
        (
            "torch.load",
            {"seglight.training.checkpoints", "seglight.data.caching.datasets"},
        ),  # checkpoints; preprocessed entries
        # atomic files; the demo's folder swap; a cache lease, renamed into place while locked
        ("os.replace", {"seglight.core.io", "seglight.data.demo", "seglight.data.caching.files"}),
        ("tempfile.mkstemp", set()),
    ],
)
def test_each_reader_and_writer_is_in_one_place(function: str, allowed: set[str]) -> None:
    users = {name for name in SOURCES if function in calls(name)}
    assert users <= allowed, sorted(users - allowed)


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("not a readable NIfTI image", {"seglight.core.io"}),  # the one message
        ("128, 128, 64", {"seglight.data.transforms"}),  # the one default size
    ],
)
def test_each_message_and_default_is_in_one_place(text: str, allowed: set[str]) -> None:
    users = {name for name, path in SOURCES.items() if text in path.read_text()}
    assert users <= allowed, sorted(users - allowed)


def test_the_builder_asks_the_data_module_instead_of_probing_it() -> None:
    source = SOURCES["seglight.config.builder"].read_text()
    for probe in ("getattr(datamodule", "read_cases(", "oriented_geometry", "nib.", "datamodule.mode"):
        assert probe not in source, probe
    assert "datamodule.network_input()" in source


def private_names(name: str) -> set[str]:
    """The private names (``_x``, not dunders) that module ``name`` reaches: attributes, ``getattr`` strings,
    imported names and the parts of the module paths it imports from."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(SOURCES[name].read_text())):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            found.add(node.value)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(node.module.split("."))
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(part for alias in node.names for part in alias.name.split("."))
    return {n for n in found if n.startswith("_") and not n.startswith("__")}


def test_framework_internals_are_reached_from_one_module() -> None:
    internals = private_names("seglight.core.internals")
    assert {"_signal_connector", "_SubprocessScriptLauncher", "_internal", "_last_lr"} <= internals
    reached = {name: private_names(name) & internals for name in SOURCES if name != "seglight.core.internals"}
    assert not {name: sorted(names) for name, names in reached.items() if names}
