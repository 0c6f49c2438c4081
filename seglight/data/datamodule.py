"""SegDataModule: Lightning's data hooks over the data package (settings -> catalog -> split -> datasets -> loaders)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from monai import transforms as mt
from monai.data import DataLoader, Dataset

from seglight.core.errors import ConfigError, DataError
from seglight.data.bad_cases import BadCasePolicy
from seglight.data.caching.build import build_dataset, limit_caches, on_gpu, pipeline
from seglight.data.catalog import Catalog, NetworkInput
from seglight.data.check_report import DatasetReport
from seglight.data.checks import check_case_data
from seglight.data.datalists import Case
from seglight.data.demo import ensure_demo_dataset
from seglight.data.folders import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN
from seglight.data.loaders import (
    DROPPED_BATCH_NOTICE,
    assemble_in_thread,
    available_cpus,
    last_batch_of_one,
    pin_memory,
    train_loader,
    val_loader,
)
from seglight.data.sampling import distributed_ranks, gather_objects, partition, shard
from seglight.data.settings import (
    DataSettings,
    ModelNeeds,
    prediction_settings,
)
from seglight.data.splits import split_cases
from seglight.data.transforms import DEFAULT_SPATIAL_SIZE

__all__ = ["CaseCheck", "SegDataModule"]

log = logging.getLogger("seglight")


class SegDataModule(L.LightningDataModule):
    """Loads a dataset (MSD, nnU-Net, a CSV/JSON datalist, subject folders, or the built-in demo), local or on S3,
    checks it, splits it, and serves train/validation batches.

    Args:
        root: folder (or ``s3://`` prefix) holding ``dataset.json`` (MSD or nnU-Net v2 layout); with a
            datalist, the base of its relative paths.
        datalist: inline list of ``{image_key: path, label_key: path}`` entries, or the path of a ``.csv`` or
            ``.json`` datalist file; paths relative to ``root`` (default: the datalist file's folder) or absolute.
        demo: settings of the synthetic demo dataset (see ``seglight.data.demo``); when given, it is generated
            on first use and read from its cache folder like any MSD dataset.
        image_key: datalist key of the image; a list of keys stacks their files as channels.
        label_key: datalist key of the label.
        spatial_size: every volume is resized to this size (x, y, z).
        a_min, a_max: ``normalize=window``'s intensity window mapped to [0, 1] (CT: -1000..1000; MRI e.g. 0..255).
        normalize, intensity: ``window``, ``zscore``, ``zscore_nonzero`` or ``ct`` (clip to ``intensity``'s low..high,
            then z-score with its mean and std), or one per channel: see ``seglight.data.normalization``.
        orientation: axis codes every volume is reoriented to (None keeps each scan's).
        batch_size: cases per training batch (patch mode: batch_size * patch.num_samples patches).
        num_workers: loader worker processes (threads for cached data); at most the CPUs this process may use.
        val_fraction: share of cases held out for validation, drawn with ``split_seed``.
        split_seed: seed of the hold-out split and of the k-fold partition.
        split_path: where this run's split is written (JSON); an existing split for the same cases is reused.
        cache: ``memory`` runs the deterministic transforms once per case and keeps the result in RAM; ``gpu``
            keeps the training cases on the training GPU, where the random flips run too; ``auto`` is ``gpu`` when
            training runs on a CUDA GPU and the cases fit in ``gpu_cache_share`` of its free memory, else
            ``memory``; ``disk`` keeps it in ``cache_dir`` across runs (invalidated when a file or a transform
            setting changes); ``none`` runs them on every access.
        cache_dir: folder of the ``disk`` cache.
        gpu_cache_share: the share of the GPU's free memory (before training starts) that ``auto`` lets the
            training cache take.
        cache_max_gb: size limit of the disk cache, the remote-file cache and the DICOM cache together: after
            setup, entries are removed least recently used first until they fit (never those a running run uses);
            None: no limit.
        on_bad_case: ``error`` refuses to train on a dataset with a bad case; ``skip`` leaves such cases out and
            lists them in ``skipped_path``.
        skipped_path: where ``skip`` lists the cases it left out (JSON).
        fold: train on all folds but this one and validate on it (0..num_folds-1); None uses ``val_fraction``.
        num_folds: folds of the seeded k-fold partition, saved to ``splits_path`` and reused from there.
        splits_path: the k-fold partition (nnU-Net's splits.json format); point all folds of a study at one.
        layout: ``auto`` (from dataset.json's keys), ``msd``, ``nnunet``, or ``folder`` (subject folders under
            ``root``, found by ``image_pattern`` and ``label_pattern``; each case is named after its folder).
        labels: declared label values and names (``{0: background, 1: organ}``), for datalists without a
            dataset.json; the check flags label values outside them.
        dicom_cache_dir: where image entries that are DICOM series (a folder, ``s3://`` prefix or ``.zip`` of one
            series) are converted to NIfTI, once (``seglight.data.dicom``); default ``<seglight's cache>/dicom``.
        remote: ``cache_dir`` (where ``s3://`` objects are downloaded), ``endpoint_url`` (an S3-compatible
            store; default ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` or AWS) and ``options`` (more s3fs
            settings, e.g. ``anon: true``). Credentials never go here: they come from the AWS chain.
        mode: ``resize`` (the lab: whole volumes resized to ``spatial_size``) or ``patch`` (volumes resampled to
            ``patch.target_spacing``, training on random patches, validation on whole volumes by sliding window).
        patch: patch mode's settings (defaults in ``seglight.data.settings.DEFAULT_PATCH``): ``size`` (training
            patch, also the sliding-window size), ``target_spacing`` (mm per voxel after resampling; None keeps
            each scan's), ``num_samples`` (patches per volume per step: a batch holds batch_size * num_samples),
            ``pos_neg_ratio`` (foreground- : background-centred patches, ``RandCropByPosNegLabeld``) and
            ``class_ratios`` (per-class centre ratios, background first, ``RandCropByLabelClassesd``; replaces
            ``pos_neg_ratio`` when given).
        image_pattern: folder layout: glob of a case's image relative to ``root`` (``*/img.nii.gz``; deeper
            trees ``*/*/img.nii.gz`` or ``**/img.nii.gz``); a list gives one pattern per channel, stacked.
        label_pattern: folder layout: glob of a case's label (``*/label.nii.gz``).
        val_root, val_datalist: a validation source, read with the same layout options as the training source
            (``val_datalist``'s relative paths are taken from ``val_root``, else from its own folder): every case
            of the training source trains and these validate; no split is drawn.
        seed: the training order and augmentation are a function of (seed, epoch, process rank, position), and
            each process's share of the training cases a function of the seed (see ``seglight.data.sampling``).

    What the model decides about the data (its classes, BatchNorm) comes in through ``for_model`` before setup;
    without it (a data module made by hand) label values are not bounded by classes and no batch is dropped.
    Under torch.distributed (DDP, FSDP) each process caches and trains on its own share of the training cases
    and scores one contiguous block of the validation cases; the split and the list of skipped cases are
    written by global rank 0 only.
    """

    def __init__(
        self,
        root: str | None = None,
        datalist: Sequence[Mapping[str, Any]] | str | None = None,
        demo: Mapping[str, Any] | None = None,
        image_key: str | Sequence[str] = "image",
        label_key: str = "label",
        spatial_size: Sequence[int] = DEFAULT_SPATIAL_SIZE,
        a_min: float = -1000.0,
        a_max: float = 1000.0,
        normalize: str | Sequence[str] = "window",
        intensity: Mapping[str, Any] | None = None,
        orientation: str | None = "RAS",
        batch_size: int = 2,
        num_workers: int = 4,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        split_path: str | None = None,
        cache: str = "auto",
        cache_dir: str | None = None,
        gpu_cache_share: float = 0.25,
        cache_max_gb: float | None = None,
        on_bad_case: str = "error",
        skipped_path: str | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        splits_path: str | None = None,
        layout: str = "auto",
        labels: Mapping[Any, Any] | None = None,
        remote: Mapping[str, Any] | None = None,
        mode: str = "resize",
        patch: Mapping[str, Any] | None = None,
        image_pattern: str | Sequence[str] = DEFAULT_IMAGE_PATTERN,
        label_pattern: str = DEFAULT_LABEL_PATTERN,
        val_root: str | None = None,
        val_datalist: Sequence[Mapping[str, Any]] | str | None = None,
        seed: int = 0,
        dicom_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        # Saved into checkpoints (as datamodule_hyper_parameters) so prediction can rebuild the same preprocessing.
        self.save_hyperparameters()
        self.settings = DataSettings.from_options(**self.hparams)  # checked once, here
        self.remote_cache = self.settings.layout.remote_cache()
        self.catalog = Catalog(self.settings, self.remote_cache)
        self.bad_cases = BadCasePolicy(self.settings.on_bad_case, self.settings.skipped_path)
        self.model_needs = ModelNeeds()
        self.num_workers = max(0, min(self.settings.num_workers, available_cpus()))
        self.train_cases: list[Case] = []
        self.val_cases: list[Case] = []
        self.train_ds: Dataset | None = None
        self.val_ds: Dataset | None = None
        # The (rank, world size) the datasets were built for, and how many samples each rank draws per epoch
        # (training: the largest share, the others pad to it) or scores (validation: the largest block).
        self._built_for: tuple[int, int] | None = None
        self._train_length = 0
        self._val_length = 0
        self._told_about_drop = False

    def for_model(self, needs: ModelNeeds) -> SegDataModule:
        """Take what the model decides about the data (``seglight.build`` passes it); call before setup."""
        if self.train_ds is not None and needs != self.model_needs:
            raise RuntimeError("SegDataModule.for_model() must be called before setup()")
        self.model_needs = needs
        return self

    # -- what the dataset holds (seglight.data.catalog), asked by the builder, the check and prediction --------

    @property
    def demo(self) -> dict[str, Any] | None:
        """The demo dataset's settings, when the data are the demo."""
        return self.settings.layout.demo

    @property
    def batch_size(self) -> int:
        """Cases per training batch."""
        return self.settings.batch_size

    def read_cases(self) -> list[Case]:
        """All cases (training source, then validation source), with absolute paths or URLs; read once."""
        return self.catalog.read_cases()

    @property
    def label_names(self) -> dict[int, str]:
        """Label values and names (background included): ``data.labels``, else dataset.json's; before setup too."""
        return self.catalog.label_names

    @property
    def num_input_channels(self) -> int:
        """Input channels of the images (declared, else counted); before setup too."""
        return self.catalog.num_input_channels

    def network_input(self) -> NetworkInput:
        """What the network sees: input size, the option that sets it, spacing, sliding windows or not."""
        return self.catalog.network_input()

    def prediction_settings(self) -> dict[str, Any]:
        """What prediction needs to read new scans and preprocess them as this data module does; saved with the
        model (``SegModule``'s ``data``) so that a checkpoint predicts on its own."""
        return prediction_settings(self.hparams)

    def inspect(self, full: bool = False, workers: int | None = None) -> tuple[list[Case], DatasetReport]:
        """Read every case, fetch remote files, and check them: headers only, or every voxel with ``full``.

        This is what ``python -m seglight.check`` runs, and its fast part runs before training.
        """
        workers = workers or max(1, self.num_workers)
        return self.catalog.inspect(full, workers, self.model_needs.num_classes)

    def transforms(self, train: bool) -> mt.Compose:
        """The full pipeline: deterministic prefix, plus the random augmentation for training."""
        return pipeline(self.settings, train)

    def split(self, cases: list[Case]) -> tuple[list[Case], list[Case]]:
        """Seeded train/validation split, saved to ``split_path``; a saved split of the same cases is reused
        (``seglight.data.splits.split_cases``)."""
        layout = self.settings.layout
        return split_cases(
            cases, self.settings.split, self.catalog.val_ids, layout.val_source, write=self._writes_files()
        )

    # -- Lightning's hooks ---------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the demo dataset on first use, and download remote files into the cache (once per node)."""
        if self.demo is not None:
            ensure_demo_dataset(**self.demo)
        self.catalog.localized_cases()

    def setup(self, stage: str | None = None) -> None:
        """Read, fetch and check the cases (the fast check), split them, and build the datasets.

        Under torch.distributed, each rank builds (and caches) only its own share of the cases.
        """
        rank, world = distributed_ranks(self.trainer)
        if self.train_ds is not None and self._built_for == (rank, world):
            return
        if self.demo is not None:
            ensure_demo_dataset(**self.demo)  # also for direct use without prepare_data (notebooks, tests)
        cases, report = self.inspect(full=False)
        self.settings.normalization.check_channels(self.num_input_channels)
        good = self.bad_cases.checked(cases, report)
        self.catalog.check_patch_fits(good)
        # The partition covers every case, skipped ones too, so skipping never reshuffles the folds.
        train, val = self.split(cases)
        good_ids = {case["case_id"] for case in good}
        train = [c for c in train if c["case_id"] in good_ids]
        val = [c for c in val if c["case_id"] in good_ids]
        if len(train) < world:
            raise ConfigError(
                f"{len(train)} training cases for {world} processes: each process trains on its own share and "
                f"needs at least one; use at most {len(train)} devices (trainer.devices x trainer.num_nodes)"
            )
        shares = partition(len(train), world, self.settings.seed)
        blocks = [shard(len(val), world, r) for r in range(world)]
        self.train_ds = self.val_ds = None
        train_ds, failed = self._dataset([train[i] for i in shares[rank]], train=True)
        val_ds, val_failed = self._dataset([val[i] for i in blocks[rank]], train=False)
        failed |= val_failed
        if world > 1:  # each rank preprocessed its own cases: all must agree on which failed
            failed = {k: v for rank_failed in gather_objects(failed) for k, v in rank_failed.items()}
        self.train_cases, self.val_cases = self.bad_cases.without_failed(
            failed, train, val, self._writes_files()
        )
        train_ids, val_ids = [c["case_id"] for c in train], [c["case_id"] for c in val]
        train_sizes = [sum(train_ids[i] not in failed for i in share) for share in shares]
        if min(train_sizes) == 0:
            raise DataError(
                f"after leaving out {len(failed)} bad case(s), a process has no training case left "
                f"(cases per process: {train_sizes}); use fewer devices or fix the cases"
            )
        self.train_ds, self.val_ds = train_ds, val_ds
        self._train_length = max(train_sizes)
        self._val_length = max(sum(val_ids[i] not in failed for i in block) for block in blocks)
        self._built_for = (rank, world)
        if getattr(self.trainer, "local_rank", 0) == 0:  # once per node
            limit_caches(self.settings.cache, self.remote_cache.cache_dir, self.settings.layout.dicom_dir)

    def train_dataloader(self) -> DataLoader:
        """This rank's training batches: its share of the cases in a seeded order, resumable mid-epoch."""
        if self.train_ds is None:
            raise RuntimeError("SegDataModule.setup() must run before the loaders are asked for")
        return train_loader(
            self.train_ds,
            batch_size=self.batch_size,
            length=self._train_length,
            seed=self.settings.seed,
            rank=distributed_ranks(self.trainer)[0],
            num_workers=self.num_workers,
            cached=self.settings.cache.mode != "none",
            in_thread=assemble_in_thread(self.trainer),
            drop_last=self.last_batch_would_hold_one(),
            pin_memory=pin_memory(self.trainer, self.on_gpu),
        )

    def val_dataloader(self) -> DataLoader:
        """This rank's block of validation cases, one per batch, padded so that all ranks take as many steps."""
        if self.val_ds is None:
            raise RuntimeError("SegDataModule.setup() must run before the loaders are asked for")
        return val_loader(
            self.val_ds,
            length=self._val_length,
            seed=self.settings.seed,
            num_workers=self.num_workers,
            cached=self.settings.cache.mode != "none",
            in_thread=assemble_in_thread(self.trainer),
            pin_memory=pin_memory(self.trainer, False),
        )

    # -- orchestration -------------------------------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        """Whether the training cache lives on the GPU (``data.cache=gpu``, or ``auto`` when it fitted)."""
        return on_gpu(self.train_ds)

    def last_batch_would_hold_one(self) -> bool:
        """Whether to drop the last training batch: only for BatchNorm networks (``ModelNeeds``), only when it
        would hold one case (``seglight.data.loaders.last_batch_of_one``)."""
        if not self.model_needs.avoid_batches_of_one or self.train_ds is None:
            return False
        patch = self.settings.patch
        per_rank = self._train_length or len(self.train_ds)  # every rank draws as many as the largest share
        drop = last_batch_of_one(per_rank, self.batch_size, patch.num_samples if patch.active else 1)
        if drop and not self._told_about_drop:
            self._told_about_drop = True
            log.info(DROPPED_BATCH_NOTICE, per_rank, self.batch_size)
        return drop

    def _dataset(self, cases: list[Case], train: bool) -> tuple[Dataset, dict[str, str]]:
        """The dataset of ``cases``, and those that failed to preprocess (case id -> problem)."""
        _, names, _ = self.catalog.localized_cases()
        check = CaseCheck(self.catalog.declared_label_values(), self.model_needs.num_classes, names)
        return build_dataset(
            cases,
            train,
            self.settings,
            check,
            names,
            workers=self.num_workers,
            on_bad=self.bad_cases.recorder(),
            trainer=self.trainer,
        )

    def _writes_files(self) -> bool:
        """Whether this process writes the run folder's files: always alone, global rank 0 under DDP."""
        return self.trainer is None or self.trainer.is_global_zero


class CaseCheck:
    """The voxel check of one case (``check_case_data``) with the dataset's labels and the model's classes.

    A class, not a closure: DataLoader workers receive it pickled, and its public settings enter the disk
    cache's key (an entry exists only for a case that passed this check), as does its module: it stays here so
    that disk caches made before stay valid.
    """

    def __init__(self, labels: set[int], num_classes: int | None, names: dict[str, str]) -> None:
        self.labels = sorted(labels)
        self.num_classes = num_classes
        self._names = names  # local copy -> URL, for messages; not part of the cache key

    def __call__(self, case: Case) -> None:
        check_case_data(case, self.labels, self.num_classes, self._names)
