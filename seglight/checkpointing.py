"""Checkpoints that survive kills: atomic writes, finding ``last.ckpt`` to resume, and checking ``ckpt_path``.

Lightning's own ``TorchCheckpointIO`` stages a local checkpoint in the system temp folder and then moves it into
place; across file systems (``/tmp`` on tmpfs or a small local disk, runs on a network share) that move is a
copy into the final name, so a kill during it leaves a truncated ``last.ckpt``. ``AtomicCheckpointIO`` writes
next to the target and renames, which POSIX makes atomic: a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from seglight.errors import ConfigError

log = logging.getLogger("seglight")

PARTIAL_SUFFIX = ".partial"
# Lightning names the last checkpoint last.ckpt, or last-v1.ckpt, ... when a file of that name already exists.
LAST_PATTERN = re.compile(r"^last(-v?\d+)?\.ckpt$")
# On SLURM's SIGUSR1 (auto-requeue), Lightning saves hpc_ckpt_<n>.ckpt in the trainer's default_root_dir.
HPC_PATTERN = re.compile(r"^hpc_ckpt_\d+\.ckpt$")
# FSDP's sharded checkpoints are folders: this file holds their loop state, next to one file of shards per rank.
SHARDED_META = "meta.pt"
# What a Lightning checkpoint written by Trainer.fit holds, beyond the weights, to continue training.
TRAINING_STATE_KEYS = ("epoch", "global_step", "loops", "optimizer_states")


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
    """``torch.save`` to ``path`` through a temporary file beside it, fsync and rename: never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Persists the rename itself (the directory entry); not possible on every platform, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_checkpoints(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed checkpoint write left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(f".*.ckpt.*{PARTIAL_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


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
        found = find_last_checkpoint(checkpoint_dir, run_dir)
        if found is None:
            log.info("resume=true: no last.ckpt in %s yet, so this is a fresh start.", checkpoint_dir)
            return None
        log.info("resume=true: continuing from %s", found)
        return check_checkpoint(found, module, option="resume=true")
    text = str(ckpt_path)
    if text == "last":
        found = find_last_checkpoint(checkpoint_dir, run_dir)
        if found is None:
            raise ConfigError(
                f"ckpt_path=last: no last.ckpt in {checkpoint_dir}. To continue a run, rerun in its folder "
                "(hydra.run.dir=<run folder> ckpt_path=last, or resume=true), or give ckpt_path=<file>."
            )
        return check_checkpoint(found, module, option="ckpt_path=last")
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


def check_checkpoint(path: str | Path, module: nn.Module | None = None, option: str | None = None) -> str:
    """``path`` as a string if it is a complete Lightning training checkpoint that fits ``module``.

    Otherwise one ConfigError that says what is wrong: truncated or not a checkpoint at all, weights only
    (no optimizer state to continue from), or saved from a different network.
    """
    option = option or f"ckpt_path={path}"
    subject = option if str(path) in option else f"{option} ({path})"
    if Path(path).is_dir():
        return _check_sharded_checkpoint(Path(path), subject)
    try:
        # mmap: only the index is read now; tensors stay on disk, so checking a large checkpoint is cheap.
        # weights_only: a file that is not a checkpoint cannot run code while we look at it.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{subject}: not a readable checkpoint (truncated, damaged or another format: {_first_line(exc)}); "
            "use another checkpoint, e.g. the run's best-*.ckpt"
        ) from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"{subject}: not a Lightning checkpoint (no 'state_dict'); seglight continues only from the "
            "last.ckpt or best-*.ckpt files of a seglight run"
        )
    missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
    if missing:
        raise ConfigError(
            f"{subject}: holds weights but no training state ({', '.join(missing)} missing), so training "
            "cannot continue from it; use the run's checkpoints/last.ckpt"
        )
    if module is not None:
        mismatch = _state_dict_mismatch(checkpoint["state_dict"], module.state_dict())
        if mismatch:
            saved_net = (checkpoint.get("hyper_parameters") or {}).get("net", {})
            target = saved_net.get("_target_", "another network") if isinstance(saved_net, Mapping) else ""
            raise ConfigError(
                f"{subject}: saved from a different network ({target}; {mismatch}); continue it with the "
                "model options it was trained with (its run folder's .hydra/config.yaml)"
            )
    return str(path)


def _check_sharded_checkpoint(path: Path, subject: str) -> str:
    """An FSDP sharded checkpoint folder: its loop state must be readable (the shards are read by FSDP itself)."""
    try:
        meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{subject}: a sharded checkpoint folder whose {SHARDED_META} is not readable ({_first_line(exc)})"
        ) from None
    missing = [key for key in ("epoch", "global_step", "loops") if key not in meta]
    if missing:
        raise ConfigError(
            f"{subject}: a sharded checkpoint folder without training state ({', '.join(missing)})"
        )
    return str(path)


def _state_dict_mismatch(saved: Mapping[str, Any], current: Mapping[str, torch.Tensor]) -> str:
    """A short description of how two state dicts differ, or '' if they have the same keys and shapes."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [
        k for k in current if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(current[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, e.g. {k} {list(saved[k].shape)} vs {list(current[k].shape)}"
        )
    return "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception (torch's explanations run on for several sentences)."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {text}".rstrip(": ")
