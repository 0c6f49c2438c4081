"""What a reader would find broken in a run folder or a cache after a fault: each file opened as its reader does.

Checkpoints with seglight's ``safe_load``; JSON and YAML records; CSV metrics (every row as long as the header);
masks with nibabel (every voxel read); TensorBoard event files with TensorBoard's own ``EventAccumulator``, which
must report no truncated or corrupt record; preprocessed cache entries as MONAI's ``PersistentDataset`` loads
them. Temporary files (hidden names: writes in progress) are no reader's business and are skipped.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from seglight.core.errors import ConfigError
from seglight.training.checkpoints import safe_load


def damaged_files(run_dir: Path, caches: Iterable[Path] = (), trackers: bool = True) -> list[str]:
    """Every file of ``run_dir`` (and of the preprocessed caches ``caches``) that its reader cannot read whole.

    ``trackers=False`` leaves out what only a resumed run repairs or rewrites (TensorBoard's and the CSV
    logger's append-only files, the records Hydra writes when a run starts): right after a kill, those may end
    in a half-written record by design.
    """
    problems: list[str] = []
    for path in _visible(run_dir, "*.ckpt"):
        try:
            safe_load(path, mmap=True)
        except ConfigError as err:
            problems.append(str(err))
    for path in _visible(run_dir, "*.json"):
        try:
            json.loads(path.read_text())
        except ValueError as err:
            problems.append(f"{path}: {err}")
    for path in _visible(run_dir, "*.nii.gz"):
        try:
            np.asanyarray(nib.load(path).dataobj)
        except Exception as err:
            problems.append(f"{path}: {type(err).__name__}: {err}")
    for cache in caches:
        for path in _visible(cache, "*.pt"):
            try:
                torch.load(path, weights_only=False)
            except Exception as err:
                problems.append(f"{path}: {type(err).__name__}: {err}")
    if trackers:
        for path in _visible(run_dir, "*.yaml"):
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                problems.append(f"{path}: {err}")
        for path in _visible(run_dir, "metrics.csv"):
            rows = list(csv.reader(path.read_text().splitlines()))
            if any(len(row) != len(rows[0]) for row in rows[1:]):
                problems.append(f"{path}: a row of another length than the header")
        problems += event_file_problems(run_dir)
    return problems


def event_file_problems(folder: Path) -> list[str]:
    """What TensorBoard reports while reading every event file under ``folder``: truncated or corrupt records."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted({p.parent for p in _visible(folder, "events.out.tfevents.*")})
    with _tensorboard_messages() as messages:
        for events in folders:
            EventAccumulator(str(events)).Reload()
    words = ("truncated", "corrupt", "dataloss", "data loss", "crc")
    return [m for m in messages if any(w in m.lower() for w in words)]


@contextmanager
def _tensorboard_messages() -> Iterator[list[str]]:
    """TensorBoard's log messages meanwhile, debug level included (where it reports a truncated record)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("tensorboard")
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _visible(folder: Path, pattern: str) -> list[Path]:
    if not Path(folder).is_dir():
        return []
    return sorted(
        p
        for p in Path(folder).rglob(pattern)
        if p.is_file()
        and not any(part.startswith(".") and part != ".hydra" for part in p.relative_to(folder).parts)
    )
