"""Checkpoints that survive kills: atomic writes, finding ``last.ckpt`` to resume, and checking ``ckpt_path``.

Lightning's own ``TorchCheckpointIO`` stages a local checkpoint in the system temp folder and then moves it into
place; across file systems (``/tmp`` on tmpfs or a small local disk, runs on a network share) that move is a
copy into the final name, so a kill during it leaves a truncated ``last.ckpt``. ``AtomicCheckpointIO`` writes
next to the target and renames, which POSIX makes atomic: a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import pathlib
import pickle
import re
import typing
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from seglight.core.errors import ConfigError, SeglightError, first_line
from seglight.core.io import atomic_path, remove_partial_files
from seglight.data.caching.datasets import nbytes
from seglight.training.compatibility import check_fits
from seglight.training.summary import read_summary

log = logging.getLogger("seglight")

# Lightning names the last checkpoint last.ckpt, or last-v1.ckpt, ... when a file of that name already exists.
LAST_PATTERN = re.compile(r"^last(-v?\d+)?\.ckpt$")
# On SLURM's SIGUSR1 (auto-requeue), Lightning saves hpc_ckpt_<n>.ckpt in the trainer's default_root_dir.
HPC_PATTERN = re.compile(r"^hpc_ckpt_\d+\.ckpt$")
# FSDP's sharded checkpoints are folders: this file holds their loop state, next to one file of shards per rank.
SHARDED_META = "meta.pt"
# The best checkpoints conf/callbacks/default.yaml names: best-epochNNN-diceX.XXXX.ckpt.
BEST_PATTERN = re.compile(r"^best.*\.ckpt$")
BEST_DICE = re.compile(r"dice(\d+(?:\.\d+)?)")
# What a Lightning checkpoint written by Trainer.fit holds, beyond the weights, to continue training.
TRAINING_STATE_KEYS = ("epoch", "global_step", "loops", "optimizer_states")
# How torch.save's files start: a zip archive (since torch 1.6), or the legacy format's pickle protocol 2.
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes go to a temporary file in the same folder, then an atomic rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or get_protocol(str(path)) not in ("file", "local"):
            # Object stores (s3://, gs://) publish an object only once its upload completes: already atomic.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, Path(str(path).removeprefix("file://")))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file beside it, fsync and rename: never a truncated file.

    A full disk is one ``DiskFullError`` naming the folder and the space needed; the previous file stays.
    """
    # Through a Python file, so a full disk surfaces as the OS error (torch's own writer reports only its offsets).
    with atomic_path(path, size_hint=nbytes(obj)) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def remove_partial_checkpoints(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed checkpoint write left in ``folder``; returns what was removed."""
    return remove_partial_files(folder, "*.ckpt")


# -- reading checkpoints safely --------------------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    """Classes a benign Lightning checkpoint may reference besides tensors and plain containers.

    Hyperparameters saved from OmegaConf objects (a notebook passing ``cfg.data.demo`` straight to the data
    module, say) pickle as these classes and the builtin types they record. Constructing any of them runs no
    code from the file, so they are allowed one by one instead of turning the protection off.
    """
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        BytesNode,
        FloatNode,
        IntegerNode,
        PathNode,
        StringNode,
        typing.Any,
        dict,
        list,
        tuple,
        set,
        int,
        float,
        str,
        bool,
        bytes,
        collections.defaultdict,
        collections.OrderedDict,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    ]


def safe_load(path: str | Path, option: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``: nothing in the file can run code.

    Tensors land on the CPU (``mmap``: left on disk until used, for cheap looks at large files). Every problem
    is one ConfigError that starts with ``option`` (default ``ckpt=<path>``): no such file; refused, naming what
    the file asked to run; unreadable (truncated, damaged, another format); or not a Lightning checkpoint.
    """
    path = Path(path).expanduser()
    subject = option or f"ckpt={path}"
    if str(path) not in subject:
        subject = f"{subject} ({path})"
    if not path.is_file():
        raise ConfigError(f"{subject}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ConfigError(
            f"{subject}: not a readable PyTorch checkpoint (an empty file, 0 bytes: a write that never finished)"
        )
    # torch < 2.5 has no allow-list; its weights_only loader then refuses OmegaConf hyperparameters too.
    allowed = (
        torch.serialization.safe_globals(_safe_globals())
        if hasattr(torch.serialization, "safe_globals")
        else contextlib.nullcontext()
    )
    try:
        with allowed:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not mmap or "mmap" not in str(exc):
                    raise
                # Written by torch.save's legacy (non-zip) format, which cannot be memory-mapped: read it whole.
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wanted is None:  # not a pickle PyTorch can read at all
            raise ConfigError(
                f"{subject}: not a readable PyTorch checkpoint ({_unreadable(path, exc)})"
            ) from None
        raise ConfigError(
            f"{subject}: refused: loading it would run code from the file (it references {wanted.group(1)}), "
            "and seglight loads checkpoints with PyTorch's weights_only=True, which allows only tensors and "
            "plain settings. Use a checkpoint written by seglight training; if you trust this file, load it "
            "yourself and re-save its state_dict and hyper_parameters as plain data."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            f"{subject}: not a readable PyTorch checkpoint ({_unreadable(path, exc)})"
        ) from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"{subject}: not a Lightning checkpoint (it has no state_dict); use the last.ckpt or best-*.ckpt "
            "files of a seglight run"
        )
    return dict(checkpoint)


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why torch could not read ``path``: cut short (a PyTorch archive without its end), or another format."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(ZIP_MAGIC):
        return (
            f"truncated or damaged: a PyTorch archive of {path.stat().st_size} bytes whose end is missing or "
            f"broken: {first_line(exc)}"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    why = detail.group(1).strip() if detail else first_line(exc)
    if head.startswith(LEGACY_MAGIC):
        return f"truncated or damaged: {why}"
    return f"another format, not a PyTorch file: it starts with {head!r}"


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The trainer's checkpoint folder: its ModelCheckpoint's ``dirpath``, else ``<default_root_dir>/checkpoints``."""
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
        return Path(ckpt.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / SHARDED_META).is_file())


def find_last_checkpoint(folder: str | Path, hpc_folder: str | Path | None = None) -> Path | None:
    """The latest checkpoint to continue from: ``last*.ckpt`` in ``folder``, or ``hpc_ckpt_<n>.ckpt`` in ``hpc_folder``.

    Lightning's ``last.ckpt`` (``last-v1.ckpt``, ...) and the ``hpc_ckpt_<n>.ckpt`` it writes on SLURM's
    auto-requeue signal compete: the one that saved more training steps wins, the newer file on a tie. FSDP's
    sharded checkpoints (folders) count too.
    """
    candidates = []
    for where, pattern in ((folder, LAST_PATTERN), (hpc_folder, HPC_PATTERN)):
        if where is not None and Path(where).is_dir():
            candidates += [p for p in Path(where).iterdir() if pattern.match(p.name) and _is_checkpoint(p)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    return max(candidates, key=lambda p: (_saved_step(p), p.stat().st_mtime_ns))


def _saved_step(path: Path) -> int:
    """The global step a checkpoint was saved at (-1 if unreadable), read cheaply (memory-mapped)."""
    try:
        target = path / SHARDED_META if path.is_dir() else path
        return int(torch.load(target, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception:
        return -1


def best_else_last(best: Iterable[str | Path | None], last: Iterable[str | Path | None]) -> Path | None:
    """The checkpoint that stands for a run's model: the first of ``best`` that is a file, else the first of ``last``.

    The one rule for every place that picks a run's model (prediction from a run folder, the evaluation after
    training, SageMaker's model file): the best by the monitored metric when there is one, else the last.
    """
    for candidate in (*best, *last):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def best_checkpoint(folder: str | Path) -> Path | None:
    """A run's best checkpoint, from its run folder or its checkpoints folder, or None when it has none.

    ``summary.json``'s ``best_checkpoint`` when that file is there; else the ``best*.ckpt`` with the highest Dice
    in its name (the newest if the names say none); else the newest ``last*.ckpt``.
    """
    folder = Path(folder)
    summary = read_summary(folder)
    ckpt_dir = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if not ckpt_dir.is_dir():
        return best_else_last([summary.best_checkpoint if summary else None], [])

    def score(path: Path) -> tuple[float, int]:
        found = BEST_DICE.search(path.name)
        return (float(found.group(1).rstrip(".")) if found else -1.0, path.stat().st_mtime_ns)

    best = [p for p in ckpt_dir.glob("best*.ckpt") if p.is_file()]
    return best_else_last(
        [summary.best_checkpoint if summary else None, max(best, key=score) if best else None],
        [find_last_checkpoint(ckpt_dir)],
    )


def trained_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint that stands for the model a fit made: the best by the monitored metric, else the last."""
    ckpt = trainer.checkpoint_callback
    return best_else_last(
        [getattr(ckpt, "best_model_path", "") or None],
        [getattr(ckpt, "last_model_path", "") or None, find_last_checkpoint(checkpoint_dir(trainer))],
    )


def model_checkpoints(spec: str | Path | Sequence[str | Path], option: str = "ckpt") -> list[Path]:
    """The checkpoint files that ``ckpt=`` names, for prediction: one model, or an ensemble of several.

    ``spec`` is a checkpoint file, a run folder (its best checkpoint, see ``best_checkpoint``), a folder of run
    folders such as the multirun of a cross-validation's folds (each run's best), or a list of any of these.
    """
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        found = [path for item in spec for path in model_checkpoints(item, option)]
        if not found:
            raise ConfigError(f"{option}=[]: give at least one checkpoint")
        return found
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{option}={spec}: no such checkpoint file or run folder")
    own = best_checkpoint(path)
    if own is not None:
        return [own]
    runs = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_dir() and ((p / "checkpoints").is_dir() or (p / ".hydra").is_dir())
        ),
        key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name),
    )
    if not runs:
        raise ConfigError(
            f"{option}={spec}: a folder without checkpoints: give a checkpoint file, a run folder "
            "(outputs/train/runs/<run>) or a folder of runs (outputs/train/multiruns/<sweep>)"
        )
    found = []
    for run in runs:
        best = best_checkpoint(run)
        if best is None:
            raise ConfigError(
                f"{option}={spec}: the run {run.name} has no checkpoint (did it fail?); to leave it out, list "
                f"the other runs' checkpoints: {option}=[<run>/checkpoints/<file>,...]"
            )
        found.append(best)
    return found


def resolve_checkpoint(
    ckpt_path: str | None,
    resume: bool,
    checkpoint_dir: str | Path,
    module: nn.Module | None = None,
    run_dir: str | Path | None = None,
    clean_up: bool = True,
) -> str | None:
    """The checkpoint a run continues from, checked, or None for a fresh start.

    ``ckpt_path`` may be a file, a run folder (its newest ``last.ckpt``), or ``last``: the newest ``last.ckpt``
    in ``checkpoint_dir``, this run's own checkpoint folder. ``resume=true`` means ``last`` when such a file
    exists and a fresh start when it does not, so one command line serves the first start and every restart.
    Lightning's SLURM auto-requeue checkpoints, ``hpc_ckpt_<n>.ckpt`` in ``run_dir``, are candidates too: the
    one with the most training steps is taken. ``clean_up`` removes what a killed write left (one process of a
    run does it).
    """
    if clean_up:
        remove_partial_checkpoints(checkpoint_dir)
    if ckpt_path in (None, ""):
        if not resume:
            return None
        found = find_resumable_checkpoint(checkpoint_dir, run_dir, module, option="resume=true")
        if found is None:
            log.info("resume=true: no last.ckpt in %s yet, so this is a fresh start.", checkpoint_dir)
            return None
        log.info("resume=true: continuing from %s", found)
        return found
    text = str(ckpt_path)
    if text == "last":
        found = find_resumable_checkpoint(checkpoint_dir, run_dir, module, option="ckpt_path=last")
        if found is None:
            raise ConfigError(
                f"ckpt_path=last: no last.ckpt in {checkpoint_dir}. To continue a run, rerun in its folder "
                "(hydra.run.dir=<run folder> ckpt_path=last, or resume=true), or give ckpt_path=<file>."
            )
        return found
    path = Path(text).expanduser()
    if path.is_dir() and not _is_checkpoint(path):
        found = find_last_checkpoint(path / "checkpoints", path) or find_last_checkpoint(path)
        if found is None:
            raise ConfigError(
                f"ckpt_path={ckpt_path}: a folder without a last.ckpt (nor checkpoints/last.ckpt)"
            )
        path = found
    if not _is_checkpoint(path):
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return check_checkpoint(path, module, option=f"ckpt_path={ckpt_path}")


def resume_candidates(folder: str | Path, hpc_folder: str | Path | None = None) -> list[Path]:
    """A run's ``last*``, ``hpc_ckpt_<n>`` and ``best*`` checkpoints, most steps first (then newest; unreadable last)."""
    candidates = []
    for where, pattern in ((folder, LAST_PATTERN), (hpc_folder, HPC_PATTERN), (folder, BEST_PATTERN)):
        if where is not None and Path(where).is_dir():
            candidates += [p for p in Path(where).iterdir() if pattern.match(p.name) and _is_checkpoint(p)]
    steps = {path: _saved_step(path) for path in dict.fromkeys(candidates)}
    return sorted(steps, key=lambda p: (steps[p], p.stat().st_mtime_ns), reverse=True)


def find_resumable_checkpoint(
    folder: str | Path,
    hpc_folder: str | Path | None = None,
    module: nn.Module | None = None,
    option: str = "resume=true",
) -> str | None:
    """The newest checkpoint of a run that loads (``resume_candidates``), checked against ``module``; None if none.

    A damaged one (cut short, empty, another tool's file, weights only) is named with the reason and passed over,
    and the one taken is named; one of another network or label set is refused (ConfigError), as is a run whose
    checkpoints are all damaged.
    """
    damaged: list[str] = []
    usable: list[tuple[Path, dict[str, Any]]] = []
    for path in resume_candidates(folder, hpc_folder):  # every one is read: each damaged one is named
        try:
            usable.append((path, training_checkpoint(path, option)))
        except ConfigError as err:
            damaged.append(f"{path.name}: {str(err).split(': ', 1)[-1]}")
            log.warning("%s; passing it over", err)
    if not usable:
        if damaged:
            raise ConfigError(
                f"{option}: no checkpoint in {folder} can be read ({'; '.join(damaged)}); move them away to "
                "start afresh, or give ckpt_path=<a checkpoint that loads>"
            )
        return None
    path, checkpoint = usable[0]
    if module is not None and not path.is_dir():
        check_fits(checkpoint, module, f"{option} ({path})")
    if damaged:
        log.warning("%s: continuing from %s, the newest checkpoint of the run that loads", option, path)
    return str(path)


def check_checkpoint(path: str | Path, module: nn.Module | None = None, option: str | None = None) -> str:
    """``path`` as a string if it is a complete Lightning training checkpoint that fits ``module``.

    Otherwise one ConfigError that says what is wrong: truncated, empty or not a checkpoint at all, weights only
    (no optimizer state to continue from), or saved from a different network or for other labels.
    """
    option = option or f"ckpt_path={path}"
    subject = option if str(path) in option else f"{option} ({path})"
    checkpoint = training_checkpoint(path, option)
    if module is not None and not Path(path).is_dir():
        check_fits(checkpoint, module, subject)
    return str(path)


def training_checkpoint(path: str | Path, option: str) -> dict[str, Any]:
    """A checkpoint training can continue from, read safely (tensors left on disk; FSDP folders: loop state only)."""
    subject = option if str(path) in option else f"{option} ({path})"
    if Path(path).is_dir():
        return _check_sharded_checkpoint(Path(path), subject)
    # mmap: only the index is read now; tensors stay on disk, so checking a large checkpoint is cheap.
    checkpoint = safe_load(path, option, mmap=True)
    missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
    if missing:
        raise ConfigError(
            f"{subject}: holds weights but no training state ({', '.join(missing)} missing), so training "
            "cannot continue from it; use the run's checkpoints/last.ckpt"
        )
    return checkpoint


def _check_sharded_checkpoint(path: Path, subject: str) -> dict[str, Any]:
    """An FSDP sharded checkpoint folder: its loop state must be readable (the shards are read by FSDP itself)."""
    try:
        meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{subject}: a sharded checkpoint folder whose {SHARDED_META} is not readable ({first_line(exc)})"
        ) from None
    missing = [key for key in ("epoch", "global_step", "loops") if key not in meta]
    if missing:
        raise ConfigError(
            f"{subject}: a sharded checkpoint folder without training state ({', '.join(missing)})"
        )
    return dict(meta)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run's ``last.ckpt`` goes: the one ModelCheckpoint keeps, else ``checkpoints/last.ckpt``."""
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.last_model_path:
        return Path(ckpt.last_model_path)
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
        path = Path(ckpt.format_checkpoint_name({}, ckpt.CHECKPOINT_NAME_LAST))
        version = ckpt.STARTING_VERSION
        while path.exists():  # a file of an earlier run in this folder: version it, as ModelCheckpoint does
            path = Path(ckpt.format_checkpoint_name({}, ckpt.CHECKPOINT_NAME_LAST, ver=version))
            version += 1
        return path
    return checkpoint_dir(trainer) / "last.ckpt"


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Save the full training state as this run's ``last.ckpt`` (through the trainer's atomic CheckpointIO)."""
    path = last_checkpoint_path(trainer)
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint):
        # Recorded before saving, as ModelCheckpoint does, so the checkpoint's own state names this file.
        ckpt.last_model_path = str(path)
    trainer.save_checkpoint(path, weights_only=False)  # everything needed to continue, not just weights
    return path


def checkpoint_epoch(path: str | Path | None) -> int | None:
    """The epoch a checkpoint was saved at, read from the file (cheaply: memory-mapped), or None."""
    if not path or not Path(path).is_file():
        return None
    try:
        return int(safe_load(path, mmap=True)["epoch"])
    except (SeglightError, KeyError, TypeError, ValueError):
        return None
