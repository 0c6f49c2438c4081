"""What a SageMaker job leaves where SageMaker collects it: ``last.ckpt`` for restarts, the model file.

SageMaker's training toolkit does not pass SIGTERM on to the script, so a spot reclaim can end a job without a
final checkpoint: ``last.ckpt`` is refreshed at the end of every epoch (and, by ``Preemption``, every N steps).
The best model so far is kept in ``SM_MODEL_DIR`` as one file that predicts on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from seglight.core.internals import last_saved_step
from seglight.training.checkpoints import (
    atomic_torch_save,
    safe_load,
    save_last_checkpoint,
    trained_checkpoint,
)

log = logging.getLogger("seglight")

MODEL_FILE = "model.ckpt"
# What the model file keeps of a training checkpoint: the weights and everything needed to predict with them
# (network, label names, preprocessing), not the optimizer and loop state needed to continue training.
MODEL_KEYS = (
    "state_dict",
    "hyper_parameters",
    "hparams_name",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
)


class SageMakerOutputs(Callback):
    """Refresh ``last.ckpt`` every ``every_n_epochs`` epochs; keep the best model in ``model_dir``.

    The model file (``model_dir/model.ckpt``) is rewritten whenever the best checkpoint changes and once more
    when fitting ends, so a job stopped early (``max_run``, a spot reclaim past ``max_wait``) still leaves one.
    Without a validated checkpoint it holds the last weights.
    """

    def __init__(self, model_dir: str, every_n_epochs: int = 1) -> None:
        self.model_dir = Path(model_dir)
        self.every_n_epochs = max(int(every_n_epochs), 1)
        self._exported: tuple[str, int] | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not _saved_at_this_step(trainer):
            save_last_checkpoint(trainer)  # on every rank: saving is collective
        self.export(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        try:
            self.export(trainer)
        except Exception as exc:  # the original exception is what the job reports
            log.warning("Could not write the model file after the error: %s", exc)

    def export(self, trainer: L.Trainer) -> Path | None:
        """Write the best (else the last) checkpoint as the model file, if it changed since the last export."""
        if not trainer.is_global_zero:
            return None
        source = trained_checkpoint(trainer)
        if source is None:
            return None
        stamp = (str(source), source.stat().st_mtime_ns)
        if stamp == self._exported and (self.model_dir / MODEL_FILE).is_file():
            return self.model_dir / MODEL_FILE
        path = write_model_file(source, self.model_dir, composed_config())
        self._exported = stamp
        log.info("Model file %s written from %s", path, source.name)
        return path


def _saved_at_this_step(trainer: L.Trainer) -> bool:
    # ModelCheckpoint saved last.ckpt after this epoch's validation already: no second write of the same state.
    ckpt = trainer.checkpoint_callback
    saved = last_saved_step(ckpt) if isinstance(ckpt, ModelCheckpoint) else None
    return saved == trainer.global_step and bool(getattr(ckpt, "save_last", False))


def write_model_file(
    checkpoint: str | Path, model_dir: str | Path, config: dict[str, Any] | None = None
) -> Path:
    """``model_dir/model.ckpt``: the checkpoint's weights, network, labels and preprocessing, plus ``config``.

    Loadable with ``torch.load(weights_only=True)`` and by ``python -m seglight.predict ckpt=<file>``.
    """
    state = safe_load(checkpoint)
    model = {key: state[key] for key in MODEL_KEYS if key in state}
    if config is not None:
        model["config"] = config  # the composed run config, as plain data
    path = Path(model_dir) / MODEL_FILE
    atomic_torch_save(model, path)
    return path


def composed_config() -> dict[str, Any] | None:
    """This Hydra run's composed config (``.hydra/config.yaml``), resolved where possible; None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if not hydra_cfg.output_subdir:
        return None
    path = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / "config.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that only resolves inside the original process
        return OmegaConf.to_container(cfg, resolve=False)
