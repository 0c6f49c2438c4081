"""SegDataModule: datalist -> seeded split -> cached datasets -> loaders."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from monai import transforms as mt
from monai.data import DataLoader, Dataset, ThreadDataLoader

from seglight.core.errors import ConfigError, DataError, SeglightError
from seglight.core.io import atomic_write_text, load_nifti
from seglight.core.utils import keep_batch_memory_mapped, plain
from seglight.data.caching.datasets import CACHE_MODES, MemoryCacheDataset, cached_dataset
from seglight.data.caching.device import (
    GPU_CACHE_MODES,
    dataset_bytes,
    move_to_device,
    training_device,
    use_gpu_cache,
)
from seglight.data.caching.files import GB, format_size, hold, prune
from seglight.data.checks import DatasetReport, Finding, check_case_data, inspect_cases
from seglight.data.datalists import (
    IMAGE,
    LABEL,
    LAYOUTS,
    Case,
    declared_channels,
    declared_label_values,
    declared_labels,
    read_dataset_json,
)
from seglight.data.demo import demo_root, ensure_demo_dataset
from seglight.data.folders import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN, IncompleteCase
from seglight.data.remote import RemoteCache, default_cache_dir, is_remote, localize_paths
from seglight.data.sampling import (
    ValidationShard,
    distributed_ranks,
    gather_objects,
    partition,
    shard,
    training_loader,
)
from seglight.data.sources import SourceCases, read_source
from seglight.data.splits import holdout_split, load_or_create_folds
from seglight.data.transforms import (
    DEFAULT_SPATIAL_SIZE,
    deterministic_transforms,
    oriented_geometry,
    random_transforms,
    resampled_shape,
)

log = logging.getLogger("seglight")

MODES = ("resize", "patch")
BAD_CASE_ACTIONS = ("error", "skip")
# Patch mode's settings (data.patch.*): nnU-Net-like patches at 1.5 x 1.5 x 2 mm, four per volume per step.
DEFAULT_PATCH: dict[str, Any] = {
    "size": [96, 96, 96],
    "target_spacing": [1.5, 1.5, 2.0],
    "num_samples": 4,
    "pos_neg_ratio": [1.0, 1.0],
    "class_ratios": None,
}
# How the training data was laid out: prediction reads new scans laid out alike the same way.
INPUT_KEYS = ("label_key", "layout", "image_pattern", "label_pattern")
# The settings of the deterministic transforms (seglight.data.transforms), which prediction replays.
PREPROCESSING_KEYS = ("spatial_size", "a_min", "a_max", "orientation", "mode", "target_spacing")


def patch_settings(patch: Mapping[str, Any] | None) -> dict[str, Any]:
    """``DEFAULT_PATCH`` updated with ``patch``; an unknown key is a ConfigError naming the known ones."""
    given = plain(patch) or {}
    unknown = sorted(set(given) - set(DEFAULT_PATCH))
    if unknown:
        raise ConfigError(
            f"data.patch.{unknown[0]}: not a patch option (the options are {', '.join(DEFAULT_PATCH)})"
        )
    return {**DEFAULT_PATCH, **given}


def prediction_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What prediction needs from a data module's settings (its hyperparameters) to read new scans and preprocess
    them as training did: the image key(s), the layout (subject-folder patterns, the datalist trained on and its
    root) and the deterministic transforms' settings.

    Reads the settings of older checkpoints too, which kept the patch options at the top level.
    """
    settings = plain(dict(hparams))
    patch = settings.get("patch") or {}
    result = {"image_key": settings.get("image_key", "image")}
    # How the training data was laid out, so new scans laid out alike are read alike (seglight.prediction.inputs).
    for key in INPUT_KEYS:
        if settings.get(key) is not None:
            result[key] = settings[key]
    if isinstance(settings.get("datalist"), str) and settings.get("root"):
        result["datalist"], result["root"] = settings["datalist"], settings["root"]
    for key in PREPROCESSING_KEYS:
        if key == "target_spacing" and "patch" in settings:
            result[key] = patch.get("target_spacing", DEFAULT_PATCH["target_spacing"])
        elif key in settings:
            result[key] = settings[key]
    if result.get("mode", "resize") != "patch":
        result.pop("target_spacing", None)  # resampling is patch mode's
    return result


@dataclass(frozen=True)
class NetworkInput:
    """What the network sees: the builder sizes and checks the network from it."""

    size: list[int]  # voxels (x, y, z) of one input
    option: str  # the option that sets the size, for messages
    spacing: list[float] | None  # mm per voxel at that size; None when unknown (remote or unreadable data)
    sliding_window: bool  # whole volumes are segmented by sliding windows of `size` (validation, prediction)


def available_cpus() -> int:
    """CPUs this process may use (respects affinity masks and container limits where the OS exposes them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SegDataModule(L.LightningDataModule):
    """Loads a dataset (MSD, nnU-Net, a CSV/JSON datalist, or the built-in demo), local or on S3, checks it,
    splits it, and serves train/validation batches.

    Args:
        root: folder (or ``s3://`` prefix) holding ``dataset.json`` (MSD or nnU-Net v2 layout); with a
            datalist, the base of its relative paths.
        datalist: inline list of ``{image_key: path, label_key: path}`` entries, or the path of a ``.csv`` or
            ``.json`` datalist file; paths relative to ``root`` (default: the datalist file's folder) or absolute.
        image_key: datalist key of the image; a list of keys stacks their files as channels.
        layout: ``auto`` (from dataset.json's keys), ``msd``, ``nnunet``, or ``folder`` (subject folders under
            ``root``, found by ``image_pattern`` and ``label_pattern``; each case is named after its folder).
        image_pattern: folder layout: glob of a case's image relative to ``root`` (``*/img.nii.gz``; deeper
            trees ``*/*/img.nii.gz`` or ``**/img.nii.gz``); a list gives one pattern per channel, stacked.
        label_pattern: folder layout: glob of a case's label (``*/label.nii.gz``).
        val_root, val_datalist: a validation source, read with the same layout options as the training source
            (``val_datalist``'s relative paths are taken from ``val_root``, else from its own folder): every case
            of the training source trains and these validate; no split is drawn.
        labels: declared label values and names (``{0: background, 1: organ}``), for datalists without a
            dataset.json; the check flags label values outside them.
        demo: settings of the synthetic demo dataset (see ``seglight.data.demo``); when given, it is generated
            on first use and read from its cache folder like any MSD dataset.
        spatial_size: every volume is resized to this size (x, y, z).
        a_min, a_max: intensity window mapped to [0, 1] (CT: -1000..1000; MRI e.g. 0..255).
        val_fraction: share of cases held out for validation, drawn with ``split_seed``.
        split_path: where this run's split is written (JSON); an existing split for the same cases is reused.
        fold: train on all folds but this one and validate on it (0..num_folds-1); None uses ``val_fraction``.
        num_folds: folds of the seeded k-fold partition, saved to ``splits_path`` and reused from there.
        splits_path: the k-fold partition (nnU-Net's splits.json format); point all folds of a study at one.
        cache: ``memory`` runs the deterministic transforms once per case and keeps the result in RAM; ``gpu``
            keeps the training cases on the training GPU, where the random flips run too; ``auto`` is ``gpu`` when
            training runs on a CUDA GPU and the cases fit in ``gpu_cache_share`` of its free memory, else
            ``memory``; ``disk`` keeps it in ``cache_dir`` across runs (invalidated when a file or a transform
            setting changes); ``none`` runs them on every access.
        gpu_cache_share: the share of the GPU's free memory (before training starts) that ``auto`` lets the
            training cache take.
        cache_dir: folder of the ``disk`` cache.
        cache_max_gb: size limit of the disk cache and the remote-file cache together: after setup, entries
            are removed least recently used first until they fit (never those a running run uses); None: no limit.
        on_bad_case: ``error`` refuses to train on a dataset with a bad case; ``skip`` leaves such cases out and
            lists them in ``skipped_path``.
        remote: ``cache_dir`` (where ``s3://`` objects are downloaded), ``endpoint_url`` (an S3-compatible
            store; default ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` or AWS) and ``options`` (more s3fs
            settings, e.g. ``anon: true``). Credentials never go here: they come from the AWS chain.
        mode: ``resize`` (the lab: whole volumes resized to ``spatial_size``) or ``patch`` (volumes resampled to
            ``patch.target_spacing``, training on random patches, validation on whole volumes by sliding window).
        patch: patch mode's settings (defaults in ``DEFAULT_PATCH``): ``size`` (training patch, also the
            sliding-window size), ``target_spacing`` (mm per voxel after resampling; None keeps each scan's),
            ``num_samples`` (patches per volume per step: a batch holds batch_size * num_samples),
            ``pos_neg_ratio`` (foreground- : background-centred patches, ``RandCropByPosNegLabeld``) and
            ``class_ratios`` (per-class centre ratios, background first, ``RandCropByLabelClassesd``; replaces
            ``pos_neg_ratio`` when given).
        seed: the training order and augmentation are a function of (seed, epoch, process rank, position), and
            each process's share of the training cases a function of the seed (see ``seglight.data.sampling``).

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
    ) -> None:
        super().__init__()
        # Saved into checkpoints (as datamodule_hyper_parameters) so prediction can rebuild the same preprocessing.
        self.save_hyperparameters()
        self.root = root
        self.datalist = plain(datalist)
        self.demo = plain(demo)
        self.image_key = plain(image_key)
        self.label_key = label_key
        self.spatial_size = [int(s) for s in plain(spatial_size)]
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.orientation = orientation
        self.batch_size = int(batch_size)
        self.num_workers = max(0, min(int(num_workers), available_cpus()))
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.split_path = split_path
        self.cache = cache
        self.cache_dir = cache_dir
        self.gpu_cache_share = float(gpu_cache_share)
        self.cache_max_gb = None if cache_max_gb is None else float(cache_max_gb)
        self.on_bad_case = on_bad_case
        self.skipped_path = skipped_path
        self.fold = None if fold is None else int(fold)
        self.num_folds = int(num_folds)
        self.splits_path = splits_path
        self.layout = layout
        self.image_pattern = plain(image_pattern)
        self.label_pattern = label_pattern
        self.val_root = val_root
        self.val_datalist = plain(val_datalist)
        self.labels = plain(labels)
        remote = plain(remote) or {}
        self.remote_cache = RemoteCache(
            cache_dir=Path(remote.get("cache_dir") or default_cache_dir() / "remote"),
            endpoint_url=remote.get("endpoint_url"),
            options=remote.get("options") or {},
        )
        self._cases: list[Case] | None = None
        self._incomplete: list[IncompleteCase] = []
        self._val_ids: set[str] | None = None  # the validation source's case ids, when there is one
        self._meta: dict[str, Any] | None = None
        self._localized: tuple[list[Case], dict[str, str], list[Finding]] | None = None
        self._failed: dict[str, str] = {}
        self.skipped: list[dict[str, Any]] = []
        # Set by seglight.build from the model: label values must lie in 0..num_classes-1, and a network with
        # BatchNorm must not see a training batch of one case.
        self.num_classes: int | None = None
        self.avoid_batches_of_one = False
        self._told_about_drop = False
        self.mode = mode
        self.patch = patch_settings(patch)
        self.target_spacing = _floats(self.patch["target_spacing"])
        self.patch_size = [int(s) for s in self.patch["size"]] if self.patch["size"] is not None else None
        self.num_samples = int(self.patch["num_samples"])
        self.pos_neg_ratio = _floats(self.patch["pos_neg_ratio"])
        self.class_ratios = _floats(self.patch["class_ratios"])
        self.seed = int(seed)
        self._validate_options()
        self.train_cases: list[Case] = []
        self.val_cases: list[Case] = []
        self.train_ds: Dataset | None = None
        self.val_ds: Dataset | None = None
        # The (rank, world size) the datasets were built for, and how many samples each rank draws per epoch
        # (training: the largest share, the others pad to it) or scores (validation: the largest block).
        self._built_for: tuple[int, int] | None = None
        self._train_length = 0
        self._val_length = 0

    def _validate_options(self) -> None:
        if self.root is None and self.datalist is None and self.demo is None:
            raise ConfigError(
                "no data given: set data.root=<folder with dataset.json> (data=msd) or use data=demo"
            )
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ConfigError(
                f"data.spatial_size must be three positive sizes (x, y, z), got {self.spatial_size}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.a_max <= self.a_min:
            raise ConfigError(f"data.a_max ({self.a_max}) must be greater than data.a_min ({self.a_min})")
        if self.cache not in (*CACHE_MODES, *GPU_CACHE_MODES):
            modes = ", ".join((*CACHE_MODES, *GPU_CACHE_MODES))
            raise ConfigError(f"data.cache must be one of {modes}, got {self.cache!r}")
        if not 0.0 < self.gpu_cache_share <= 1.0:
            raise ConfigError(
                f"data.gpu_cache_share must be above 0 and at most 1, got {self.gpu_cache_share}"
            )
        if self.cache_max_gb is not None and self.cache_max_gb <= 0:
            raise ConfigError(
                f"data.cache_max_gb must be a positive number of GB (or null), got {self.cache_max_gb}"
            )
        if self.on_bad_case not in BAD_CASE_ACTIONS:
            raise ConfigError(
                f"data.on_bad_case must be one of {', '.join(BAD_CASE_ACTIONS)}, got {self.on_bad_case!r}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.num_folds < 2:
            raise ConfigError(f"data.num_folds must be at least 2, got {self.num_folds}")
        if self.fold is not None and self.has_val_source:
            raise ConfigError(
                "data.fold and a validation source (data.val_root / data.val_datalist) exclude each other: "
                "the validation source replaces the split"
            )
        if self.fold is not None and not 0 <= self.fold < self.num_folds:
            raise ConfigError(
                f"data.fold must be between 0 and data.num_folds-1 ({self.num_folds - 1}), got {self.fold}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")
        self._validate_patch_options()

    def _validate_patch_options(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"data.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode != "patch":
            return
        if self.patch_size is None or len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(
                f"data.patch.size must be three positive sizes (x, y, z), got {self.patch_size}"
            )
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or min(self.target_spacing) <= 0
        ):
            raise ConfigError(
                "data.patch.target_spacing must be three positive spacings in mm (or null), "
                f"got {self.target_spacing}"
            )
        if self.num_samples < 1:
            raise ConfigError(f"data.patch.num_samples must be at least 1, got {self.num_samples}")
        if self.pos_neg_ratio is None or len(self.pos_neg_ratio) != 2 or min(self.pos_neg_ratio) < 0:
            raise ConfigError(
                f"data.patch.pos_neg_ratio must be two non-negative numbers, got {self.pos_neg_ratio}"
            )
        if sum(self.pos_neg_ratio) == 0:
            raise ConfigError("data.patch.pos_neg_ratio must not be [0, 0]")
        if self.class_ratios is not None and (min(self.class_ratios) < 0 or sum(self.class_ratios) == 0):
            raise ConfigError(
                f"data.patch.class_ratios must be non-negative and not all 0, got {self.class_ratios}"
            )

    # -- where the cases come from -------------------------------------------------------------------------

    @property
    def data_root(self) -> Path | str | None:
        """The dataset folder: the demo's cache folder, or ``root`` (an ``s3://`` URL stays a string)."""
        if self.demo is not None:
            return demo_root(**self.demo)
        if self.root is None:
            return None
        return str(self.root) if is_remote(self.root) else Path(self.root).expanduser()

    def prepare_data(self) -> None:
        """Generate the demo dataset on first use, and download remote files into the cache (once per node)."""
        if self.demo is not None:
            ensure_demo_dataset(**self.demo)
        self.localized_cases()

    @property
    def has_val_source(self) -> bool:
        """Whether validation cases come from a source of their own (``val_root`` / ``val_datalist``)."""
        return self.val_root is not None or self.val_datalist is not None

    def read_cases(self) -> list[Case]:
        """All cases (training source, then validation source), with absolute paths or URLs; read once.

        Case folders with a missing or extra file are not among them: ``inspect`` reports them.
        """
        if self._cases is None:
            train = self._read_source(self.data_root, self.datalist)
            cases, incomplete = list(train.cases), list(train.incomplete)
            if self.has_val_source:
                val_root = self.val_root
                if val_root is not None and not is_remote(val_root):
                    val_root = str(Path(val_root).expanduser())
                val = self._read_source(val_root, self.val_datalist, others=train.cases)
                _refuse_shared_ids(train, val, str(self.val_datalist or self.val_root))
                self._val_ids = {c["case_id"] for c in val.cases} | {c.case_id for c in val.incomplete}
                cases += val.cases
                incomplete += val.incomplete
            self._cases, self._incomplete, self._meta = cases, incomplete, train.meta
        return [dict(case) for case in self._cases]

    def _read_source(self, root: Any, datalist: Any, others: Sequence[Case] = ()) -> SourceCases:
        return read_source(
            root,
            datalist,
            layout=self.layout,
            image_key=self.image_key,
            label_key=self.label_key,
            image_pattern=self.image_pattern,
            label_pattern=self.label_pattern,
            store=self.remote_cache,
            others=others,
        )

    def dataset_meta(self) -> dict[str, Any]:
        """dataset.json (or a JSON datalist's keys besides ``training``); empty when there is none yet."""
        if self._meta is None:
            try:
                if isinstance(self.datalist, str) or self.layout == "folder":
                    self.read_cases()
                else:
                    self._meta = (
                        read_dataset_json(self.data_root, self.remote_cache) if self.data_root else {}
                    )
            except SeglightError:
                return {}  # not there yet (the demo before generation) or unreadable: setup says why
        return dict(self._meta or {})

    @property
    def label_names(self) -> dict[int, str]:
        """Label values and names (background included): ``data.labels``, else dataset.json's ``labels``.

        Reads MSD's ``{"0": "background"}`` and nnU-Net v2's ``{"background": 0}``; cheap, works before setup.
        """
        if self.labels:
            return declared_labels({"labels": self.labels})
        return declared_labels(self.dataset_meta())

    @property
    def num_input_channels(self) -> int:
        """Input channels: declared by dataset.json (MSD ``modality``, nnU-Net ``channel_names``), else the number
        of files per case image, else the 4th axis of the first image's header; works before setup."""
        declared = declared_channels(self.dataset_meta())
        if declared:
            return declared
        try:
            image = self.read_cases()[0][IMAGE]
        except (SeglightError, IndexError):
            return 1
        if isinstance(image, list):
            return len(image)
        try:
            path = self.remote_cache.fetch(image) if is_remote(image) else image
            shape = load_nifti(path).shape
        except Exception:  # unreadable: the check at setup names the file
            return 1
        return int(shape[3]) if len(shape) == 4 else 1

    def declared_label_values(self) -> set[int]:
        """Every label value the dataset declares (``data.labels``, else dataset.json's, regions included)."""
        meta = {"labels": self.labels} if self.labels else self.dataset_meta()
        return set(self.label_names) | declared_label_values(meta)

    def network_input(self) -> NetworkInput:
        """What the network sees: its input size (and the option that sets it), the voxel spacing at that size,
        and whether whole volumes are segmented by sliding windows; works before setup.

        Resize mode: ``spatial_size``, at the first case's spacing scaled by the resizing. Patch mode:
        ``patch.size`` at ``patch.target_spacing`` (or the first case's own spacing), by sliding windows.
        """
        if self.mode == "patch":
            spacing = self.target_spacing or self._first_case_geometry()[1]
            return NetworkInput(list(self.patch_size or []), "data.patch.size", spacing, True)
        shape, spacing = self._first_case_geometry()
        if shape is not None and spacing is not None:
            spacing = [s * n / m for s, n, m in zip(spacing, shape, self.spatial_size, strict=True)]
        return NetworkInput(list(self.spatial_size), "data.spatial_size", spacing, False)

    def _first_case_geometry(self) -> tuple[list[int] | None, list[float] | None]:
        """(shape, spacing) of the first case's image after reorientation, from its header; Nones if unknown."""
        try:
            image = self.read_cases()[0][IMAGE]
            path = image[0] if isinstance(image, list) else image
            if is_remote(path):
                return None, None  # not fetched yet: nothing is downloaded just to size the network
            return oriented_geometry(str(path), self.orientation)
        except (SeglightError, IndexError, OSError):  # no data yet (the demo before generation) or unreadable
            return None, None

    def prediction_settings(self) -> dict[str, Any]:
        """What prediction needs to read new scans and preprocess them as this data module does; saved with the
        model (``SegModule``'s ``data``) so that a checkpoint predicts on its own."""
        return prediction_settings(self.hparams)

    def localized_cases(self) -> tuple[list[Case], dict[str, str], list[Finding]]:
        """The cases with every remote file replaced by its local copy (fetched now unless cached).

        Returns the cases, the URL of each local copy (to name files in messages) and a finding for each
        object that could not be fetched. A problem every object would share (bucket, credentials) raises.
        """
        if self._localized is not None:
            return self._localized
        cases = self.read_cases()
        urls = [p for case in cases for p in _paths_of(case) if is_remote(p)]
        if not urls:
            self._localized = (cases, {}, [])
            return self._localized
        hold(self.remote_cache.cache_dir)  # pruning keeps what this run fetches or reuses
        fetched, problems = self.remote_cache.fetch_all(urls)
        findings = []
        for index, case in enumerate(cases):
            for url in _paths_of(case):
                if url in problems:
                    message = problems[url].removeprefix(f"{url}: ")
                    findings.append(Finding("error", url, message, index))
            case[IMAGE] = localize_paths(case[IMAGE], fetched)
            case[LABEL] = localize_paths(case[LABEL], fetched)
        usage = self.remote_cache.usage()
        log.info(
            "Remote files: %d of %d fetched now (%.1f MB); cache %s",
            self.remote_cache.downloaded,
            len(set(urls)),
            self.remote_cache.downloaded_bytes / 1e6,
            usage,
        )
        self._localized = (cases, {str(path): url for url, path in fetched.items()}, findings)
        return self._localized

    def inspect(self, full: bool = False, workers: int | None = None) -> tuple[list[Case], DatasetReport]:
        """Read every case, fetch remote files, and check them: headers only, or every voxel with ``full``.

        Returns the cases (local paths; a case folder with a missing or extra file only as its ``case_id``) and
        the report; this is what ``python -m seglight.check`` runs, and its fast part runs before training.
        """
        cases, names, fetch_findings = self.localized_cases()
        unfetched = {f.case_index for f in fetch_findings if f.case_index is not None}
        report = inspect_cases(
            cases,
            full=full,
            labels=self.label_names,
            label_values=self.declared_label_values(),
            channels=declared_channels(self.dataset_meta()),
            names=names,
            workers=workers or max(1, self.num_workers),
            exclude=unfetched,
            num_classes=self.num_classes,
        )
        report.findings[:0] = fetch_findings
        # Case folders with a missing or extra file count as bad cases, numbered after the readable ones; their
        # ids stay in the returned cases, so the split covers them and skipping one never reshuffles it.
        for number, incomplete in enumerate(self._incomplete, start=len(cases)):
            report.findings += [Finding("error", incomplete.where, p, number) for p in incomplete.problems]
        report.num_cases += len(self._incomplete)
        return cases + [{"case_id": i.case_id} for i in self._incomplete], report

    # -- split and datasets --------------------------------------------------------------------------------

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
        _log_warnings(report)
        bad = report.bad_cases()
        if bad and self.on_bad_case == "error":
            report.raise_for_errors()
        self.skipped = [{"case_id": cases[i]["case_id"], "problems": bad[i]} for i in sorted(bad)]
        good = [case for i, case in enumerate(cases) if i not in bad]
        self.check_patch_fits(good)
        # The partition covers every case, skipped ones too, so skipping never reshuffles the folds.
        train, val = self.split(cases)
        good_ids = {case["case_id"] for case in good}
        self.train_cases = [c for c in train if c["case_id"] in good_ids]
        self.val_cases = [c for c in val if c["case_id"] in good_ids]
        if len(self.train_cases) < world:
            raise ConfigError(
                f"{len(self.train_cases)} training cases for {world} processes: each process trains on its own "
                f"share and needs at least one; use at most {len(self.train_cases)} devices (trainer.devices x "
                "trainer.num_nodes)"
            )
        shares = partition(len(self.train_cases), world, self.seed)
        blocks = [shard(len(self.val_cases), world, r) for r in range(world)]
        self._failed = {}
        self.train_ds = self._dataset([self.train_cases[i] for i in shares[rank]], train=True)
        self.val_ds = self._dataset([self.val_cases[i] for i in blocks[rank]], train=False)
        if world > 1:  # each rank preprocessed its own cases: all must agree on which failed
            self._failed = {k: v for failed in gather_objects(self._failed) for k, v in failed.items()}
        train_ids = [c["case_id"] for c in self.train_cases]
        val_ids = [c["case_id"] for c in self.val_cases]
        self._handle_failed_cases()
        train_sizes = [sum(train_ids[i] not in self._failed for i in share) for share in shares]
        if min(train_sizes) == 0:
            self.train_ds = self.val_ds = None
            raise DataError(
                f"after leaving out {len(self._failed)} bad case(s), a process has no training case left "
                f"(cases per process: {train_sizes}); use fewer devices or fix the cases"
            )
        self._train_length = max(train_sizes)
        self._val_length = max(sum(val_ids[i] not in self._failed for i in block) for block in blocks)
        self._built_for = (rank, world)
        self.limit_caches()

    @property
    def preprocessed_dir(self) -> Path:
        """Folder of the ``disk`` preprocessing cache."""
        return Path(self.cache_dir or default_cache_dir() / "preprocessed").expanduser()

    def limit_caches(self) -> None:
        """Prune the disk and remote-file caches to ``cache_max_gb``, least recently used first (once per node)."""
        if self.cache_max_gb is None or getattr(self.trainer, "local_rank", 0) != 0:
            return
        limit = int(self.cache_max_gb * GB)
        result = prune({"preprocessed": self.preprocessed_dir, "remote": self.remote_cache.cache_dir}, limit)
        if result.removed:
            log.info(
                "Caches over data.cache_max_gb=%g: removed %d least recently used entries (%s), %s kept",
                self.cache_max_gb,
                result.removed,
                format_size(result.removed_bytes),
                format_size(result.kept_bytes),
            )
        if result.kept_bytes > limit:
            log.warning(
                "Caches hold %s, over data.cache_max_gb=%g: %s of it is in use by this or another running run "
                "and is kept until it ends",
                format_size(result.kept_bytes),
                self.cache_max_gb,
                format_size(result.in_use_bytes),
            )

    def _handle_failed_cases(self) -> None:
        """Cases that failed to preprocess: refuse to train (``error``) or leave them out (``skip``), recorded."""
        if self._failed and self.on_bad_case == "error":
            self.train_ds = self.val_ds = None
            lines = list(self._failed.values())
            raise DataError(
                lines[0]
                if len(lines) == 1
                else f"{len(lines)} cases cannot be used:\n  " + "\n  ".join(lines)
            )
        self.skipped += [{"case_id": c, "problems": [m]} for c, m in self._failed.items()]
        self.train_cases = [c for c in self.train_cases if c["case_id"] not in self._failed]
        self.val_cases = [c for c in self.val_cases if c["case_id"] not in self._failed]
        if self.on_bad_case != "skip":
            return
        if self._writes_files():  # global rank 0 under DDP
            SkippedCases(self.skipped_path).write(self.skipped)
        if self.skipped:
            log.warning(
                "Skipping %d bad case(s) (data.on_bad_case=skip), listed in %s: %s",
                len(self.skipped),
                self.skipped_path,
                "; ".join(p for s in self.skipped for p in s["problems"]),
            )
        if not self.train_cases or not self.val_cases:
            self.train_ds = self.val_ds = None
            raise DataError(
                f"after skipping {len(self.skipped)} bad case(s), {len(self.train_cases)} training and "
                f"{len(self.val_cases)} validation cases remain; training needs at least one of each"
            )

    def split(self, cases: list[Case]) -> tuple[list[Case], list[Case]]:
        """Seeded train/validation split, saved to ``split_path``; a saved split of the same cases is reused.

        With ``fold`` set, the split is that fold of the k-fold partition in ``splits_path`` (made once, then
        reused, so every fold of a study shares it); with a validation source, its cases validate and all others
        train; otherwise ``val_fraction`` of the cases are held out.
        """
        by_id = {case["case_id"]: case for case in cases}  # unique: the readers see to it
        if self._val_ids is not None:
            # A validation source of its own: every other case trains, and no split is drawn.
            train_ids = sorted(i for i in by_id if i not in self._val_ids)
            val_ids = sorted(i for i in by_id if i in self._val_ids)
            record: dict[str, Any] = {"val_source": str(self.val_datalist or self.val_root)}
            return self._save_split(record, train_ids, val_ids, by_id)
        if len(by_id) < 2:
            raise ConfigError(
                f"the dataset has {len(by_id)} case(s); training needs at least 2 (train + validation)"
            )
        record = {"seed": self.split_seed}
        if self.fold is not None:
            folds = load_or_create_folds(self.splits_path, set(by_id), self.num_folds, self.split_seed)
            train_ids, val_ids = folds[self.fold]["train"], folds[self.fold]["val"]
            record.update(fold=self.fold, num_folds=self.num_folds, splits_path=self.splits_path)
        else:
            saved = self._saved_split(set(by_id))
            train_ids, val_ids = (
                saved if saved is not None else holdout_split(by_id, self.val_fraction, self.split_seed)
            )
            record.update(val_fraction=self.val_fraction)
        return self._save_split(record, train_ids, val_ids, by_id)

    def _save_split(
        self, record: dict[str, Any], train_ids: list[str], val_ids: list[str], by_id: dict[str, Case]
    ) -> tuple[list[Case], list[Case]]:
        if self.split_path and self._writes_files():
            record.update(train=list(train_ids), val=list(val_ids))
            atomic_write_text(Path(self.split_path), json.dumps(record, indent=2))
        return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]

    def _writes_files(self) -> bool:
        """Whether this process writes the run folder's files: always alone, global rank 0 under DDP."""
        return self.trainer is None or self.trainer.is_global_zero

    def _saved_split(self, ids: set[str]) -> tuple[list[str], list[str]] | None:
        if not self.split_path or not Path(self.split_path).is_file():
            return None
        try:
            record = json.loads(Path(self.split_path).read_text())
            train_ids, val_ids = list(record["train"]), list(record["val"])
            if record.get("fold") is not None:
                return None  # a fold's split: the hold-out split is made afresh
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if set(train_ids) | set(val_ids) != ids:
            return None  # a different dataset: make a new split
        return train_ids, val_ids

    def transforms(self, train: bool) -> mt.Compose:
        """The full pipeline: deterministic prefix, plus the random flip for training."""
        steps = deterministic_transforms(
            IMAGE,
            LABEL,
            self.spatial_size,
            self.a_min,
            self.a_max,
            self.orientation,
            mode=self.mode,
            target_spacing=self.target_spacing,
        )
        if train:
            steps += random_transforms(
                IMAGE,
                LABEL,
                mode=self.mode,
                patch_size=self.patch_size,
                num_samples=self.num_samples,
                pos_neg_ratio=self.pos_neg_ratio,
                class_ratios=self.class_ratios,
            )
        return mt.Compose(steps)

    def check_patch_fits(self, cases: Sequence[Case]) -> None:
        """Patch mode: ConfigError unless every volume, once resampled, is at least the patch size (from headers).

        Also checks that ``class_ratios`` has one entry per label class of the dataset.
        """
        if self.mode != "patch":
            return
        names = self.label_names
        if self.class_ratios is not None and names and len(self.class_ratios) != len(names):
            raise ConfigError(
                f"data.patch.class_ratios has {len(self.class_ratios)} entries but the dataset has {len(names)} label "
                f"classes ({', '.join(f'{v} {n}' for v, n in sorted(names.items()))}): give one ratio per class"
            )
        shapes: dict[str, list[int]] = {}
        for case in cases:
            path = case[IMAGE][0] if isinstance(case[IMAGE], list) else case[IMAGE]
            if "://" in str(path):
                continue  # remote files are checked when fetched; padding keeps the crops valid
            shape, spacing = oriented_geometry(str(path), self.orientation)
            if self.target_spacing is not None:
                shape = resampled_shape(shape, spacing, self.target_spacing)
            shapes[case["case_id"]] = shape
        too_small = [
            c
            for c, shape in shapes.items()
            if any(p > n for p, n in zip(self.patch_size, shape, strict=True))
        ]
        if not too_small:
            return
        smallest = [min(shape[axis] for shape in shapes.values()) for axis in range(3)]
        culprit = f"{too_small[0]} ({shapes[too_small[0]]} voxels)"
        if len(too_small) > 1:
            culprit += f" and {len(too_small) - 1} more"
        where = (
            f"at data.patch.target_spacing={self.target_spacing} mm"
            if self.target_spacing
            else "at its own spacing"
        )
        raise ConfigError(
            f"data.patch.size={self.patch_size} is larger than the volume: case {culprit} {where}; "
            f"use data.patch.size no larger than {smallest} (the smallest volume), or a finer "
            "data.patch.target_spacing"
        )

    def _dataset(self, cases: list[Case], train: bool) -> Dataset:
        """The dataset of ``cases``: deterministic part cached per ``cache``; cases that fail go to ``_failed``."""
        transform = self.transforms(train)
        cache_dir = self.preprocessed_dir
        if self.cache == "disk":
            hold(cache_dir)  # pruning keeps the entries this run reads
        _, names, _ = self.localized_cases()
        # The GPU modes fill the cache in host memory first; the training cases then move to the GPU if they go.
        store = "memory" if self.cache in GPU_CACHE_MODES else self.cache
        dataset, failures = cached_dataset(
            cases,
            transform,
            store,
            cache_dir,
            workers=max(1, self.num_workers),
            verify=CaseCheck(self.declared_label_values(), self.num_classes, names),
            keep_meta=not train,  # training steps need no affine or header; validation metrics need spacing
            # cache=none: training cases are checked when a loader worker first reads them; validation cases
            # now, so that every validation (and the best checkpoint) is measured on the same cases.
            verify_on_read=train,
            on_bad=SkippedCases(self.skipped_path) if self.on_bad_case == "skip" else None,
        )
        for index, message in failures.items():
            for local, url in names.items():  # name downloaded files by their URL
                message = message.replace(local, url)
            self._failed[cases[index]["case_id"]] = message
        if isinstance(dataset, MemoryCacheDataset):
            kept = [case for i, case in enumerate(cases) if i not in failures]
            _warn_empty_labels(kept, dataset.data)
        if train and self.cache in GPU_CACHE_MODES:
            device = training_device(self.trainer)
            if use_gpu_cache(self.cache, dataset_bytes(dataset), device, self.gpu_cache_share):
                assert device is not None
                dataset = move_to_device(dataset, device)
        return dataset

    @property
    def on_gpu(self) -> bool:
        """Whether the training cache lives on the GPU (``data.cache=gpu``, or ``auto`` when it fitted)."""
        data = getattr(self.train_ds, "data", None)
        first = data[0] if data else None
        return isinstance(first, Mapping) and any(
            isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in first.values()
        )

    def _pin_memory(self, dataset: Dataset) -> bool:
        # Batches bound for a CUDA device come from page-locked memory, so the copy runs without blocking.
        return training_device(self.trainer) is not None and not (dataset is self.train_ds and self.on_gpu)

    # -- loaders -------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """This rank's training batches: its share of the cases in a seeded order, resumable mid-epoch."""
        if self.train_ds is None:
            raise RuntimeError("SegDataModule.setup() must run before the loaders are asked for")
        rank, _ = distributed_ranks(self.trainer)
        threaded = self.cache != "none"
        if threaded:
            keep_batch_memory_mapped()  # page faults on every new batch would otherwise dominate the step
        return training_loader(
            self.train_ds,
            batch_size=self.batch_size,
            length=self._train_length,
            seed=self.seed,
            rank=rank,
            num_workers=self.num_workers,
            threaded=threaded,
            drop_last=self.last_batch_would_hold_one(),
            **self._loader_options(threaded, self._pin_memory(self.train_ds)),
        )

    def val_dataloader(self) -> DataLoader:
        """This rank's block of validation cases, one per batch, padded so that all ranks take as many steps."""
        if self.val_ds is None:
            raise RuntimeError("SegDataModule.setup() must run before the loaders are asked for")
        pin_memory = self._pin_memory(self.val_ds)
        dataset = ValidationShard(self.val_ds, self._val_length)
        # Its own generator: creating the loader or an iterator never draws from torch's global random state.
        generator = torch.Generator().manual_seed(self.seed % 2**63)
        if self.cache != "none":
            return ThreadDataLoader(
                dataset,
                batch_size=1,
                shuffle=False,
                generator=generator,
                **self._loader_options(True, pin_memory),
            )
        return DataLoader(
            dataset,
            batch_size=1,
            shuffle=False,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **self._loader_options(False, pin_memory),
        )

    def last_batch_would_hold_one(self) -> bool:
        """Whether to drop the last training batch: only for BatchNorm networks, only when it would hold one case.

        BatchNorm cannot normalise one case at a 1x1x1 feature map (small inputs reach one); dropping that batch
        costs one case per epoch, a different one each epoch as the order is shuffled.
        """
        if not self.avoid_batches_of_one or self.train_ds is None:
            return False
        if self.mode == "patch" and self.num_samples > 1:
            return False  # each case brings several patches
        per_rank = self._train_length or len(self.train_ds)  # every rank draws as many as the largest share
        drop = self.batch_size > 1 and per_rank > self.batch_size and per_rank % self.batch_size == 1
        if drop and not self._told_about_drop:
            self._told_about_drop = True
            log.info(
                "The network has BatchNorm and %d training cases leave a last batch of one: it is dropped each "
                "epoch (data.batch_size=%d)",
                per_rank,
                self.batch_size,
            )
        return drop

    @staticmethod
    def _loader_options(threaded: bool, pin_memory: bool) -> dict[str, Any]:
        # Batches bound for a CUDA device come from page-locked memory, so the copy runs without blocking.
        if threaded:
            # Cached data: only the random augmentation is left per step, and a background thread assembles
            # batches faster than worker processes, which would copy every batch through shared memory (MONAI's
            # fast-training recipe). The thread's queue is polled every buffer_timeout seconds, which is also how
            # late the end of an epoch is noticed: MONAI's 10 ms default would add 10 ms to every epoch.
            return {"buffer_timeout": 0.001, "pin_memory": pin_memory}
        return {"pin_memory": pin_memory}


class CaseCheck:
    """The voxel check of one case (``check_case_data``) with the dataset's labels and the model's classes.

    A class, not a closure: DataLoader workers receive it pickled, and its public settings enter the disk
    cache's key (an entry exists only for a case that passed this check).
    """

    def __init__(self, labels: set[int], num_classes: int | None, names: dict[str, str]) -> None:
        self.labels = sorted(labels)
        self.num_classes = num_classes
        self._names = names  # local copy -> URL, for messages; not part of the cache key

    def __call__(self, case: Case) -> None:
        check_case_data(case, self.labels, self.num_classes, self._names)


class SkippedCases:
    """A run's ``skipped_cases.json`` (``data.on_bad_case=skip``), which any process of the run may add to.

    With ``data.cache=none`` a bad training case is found by whichever loader worker reads it first; each adds
    its case under a file lock, so the record of the whole run ends up in one file.
    """

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._reported: set[str] = set()

    def write(self, skipped: list[dict[str, Any]]) -> None:
        """Record ``skipped`` (case id and problems each), replacing what an earlier session recorded."""
        if self.path is not None:
            with self._lock():
                self._save(skipped)

    def __call__(self, case: Case, message: str) -> None:
        """Report and record one case found bad while training (training goes on without it)."""
        case_id = str(case.get("case_id"))
        if case_id in self._reported:
            return
        self._reported.add(case_id)
        log.warning("Skipping case %s (data.on_bad_case=skip): %s", case_id, message)
        if self.path is None:
            return
        with self._lock():
            try:
                skipped = json.loads(self.path.read_text()).get("skipped", [])
            except (OSError, ValueError, AttributeError):
                skipped = []
            if all(entry.get("case_id") != case_id for entry in skipped):
                self._save([*skipped, {"case_id": case_id, "problems": [message]}])

    def _lock(self) -> Any:
        from filelock import FileLock

        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.with_name(f".{self.path.name}.lock")))

    def _save(self, skipped: list[dict[str, Any]]) -> None:
        assert self.path is not None
        atomic_write_text(self.path, json.dumps({"on_bad_case": "skip", "skipped": skipped}, indent=2))


def _refuse_shared_ids(train: SourceCases, val: SourceCases, source: str) -> None:
    """A DataError when a validation case has the id of a training case (outputs keyed by case would clash)."""
    train_ids = {c["case_id"]: c for c in train.cases} | {c.case_id: {} for c in train.incomplete}
    for case in [*val.cases, *({"case_id": c.case_id} for c in val.incomplete)]:
        other = train_ids.get(case["case_id"])
        if other is not None:
            files = " and ".join(str(_first(c.get(IMAGE))) for c in (other, case) if c.get(IMAGE))
            raise DataError(
                f"{source}: the validation case {case['case_id']!r} has the id of a training case"
                f"{f' ({files})' if files else ''}; the two sources must not share cases or case ids"
            )


def _first(image: Any) -> Any:
    return image[0] if isinstance(image, list) else image


def _paths_of(case: Case) -> list[str]:
    files: list[str] = []
    for key in (IMAGE, LABEL):
        value = case[key]
        files.extend(str(v) for v in value) if isinstance(value, list) else files.append(str(value))
    return files


def _warn_empty_labels(cases: list[Case], items: list[Any]) -> None:
    """A warning per case whose preprocessed label has no foreground voxel (the header check cannot see it; the
    cached volumes are in memory, so the look costs nothing)."""
    for case, item in zip(cases, items, strict=False):
        label = item.get(LABEL) if isinstance(item, dict) else None
        if isinstance(label, torch.Tensor) and not bool(label.any()):
            log.warning(
                "Data check: %s: the label is all background after preprocessing (no labelled voxel)",
                case["case_id"],
            )


def _log_warnings(report: DatasetReport, limit: int = 5) -> None:
    warnings = report.warnings
    for finding in warnings[:limit]:
        log.warning("Data check: %s", finding)
    if len(warnings) > limit:
        log.warning(
            "Data check: %d more warnings; python -m seglight.check lists them all", len(warnings) - limit
        )


def _floats(value: Any) -> list[float] | None:
    return [float(v) for v in plain(value)] if value is not None else None
