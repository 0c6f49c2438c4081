"""The data module's settings (the ``data.*`` config keys) as frozen dataclasses that check themselves.

``DataSettings.from_options`` builds them once from ``SegDataModule``'s arguments: where the cases come from
(``LayoutSettings``), how they are split (``SplitSettings``), cached (``CacheSettings``) and cut (``PatchSettings``),
how intensities are normalised (``NormalizationSettings``), and the rest. Each raises a ConfigError naming the
option when a value is out of range. ``prediction_settings`` picks from a data module's saved settings what
prediction needs; ``ModelNeeds`` is what the model decides about the data, given to the data module before setup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglight.core.containers import plain
from seglight.core.errors import ConfigError
from seglight.data.caching.datasets import CACHE_MODES
from seglight.data.caching.device import GPU_CACHE_MODES
from seglight.data.datalists import LAYOUTS
from seglight.data.normalization import channel_count, intensity_settings, normalize_modes
from seglight.data.remote import RemoteCache, default_cache_dir, is_remote

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
PREPROCESSING_KEYS = (
    "spatial_size",
    "a_min",
    "a_max",
    "normalize",
    "intensity",
    "orientation",
    "mode",
    "target_spacing",
)


@dataclass(frozen=True)
class ModelNeeds:
    """What the model decides about its data; ``SegDataModule.for_model`` takes it before setup.

    ``num_classes``: label values must lie in 0..num_classes-1 (checked when each case is first read); None
    checks nothing. ``avoid_batches_of_one``: the network normalises over the batch (BatchNorm), so a last
    training batch of one case is dropped.
    """

    num_classes: int | None = None
    avoid_batches_of_one: bool = False


@dataclass(frozen=True)
class PatchSettings:
    """``data.mode`` and patch mode's settings (``data.patch.*``), which are checked in patch mode only."""

    mode: str
    size: list[int] | None
    target_spacing: list[float] | None
    num_samples: int
    pos_neg_ratio: list[float] | None
    class_ratios: list[float] | None

    @classmethod
    def from_options(cls, mode: str, patch: Mapping[str, Any] | None) -> PatchSettings:
        """``DEFAULT_PATCH`` updated with ``patch``; an unknown key is a ConfigError naming the known ones."""
        given = plain(patch) or {}
        unknown = sorted(set(given) - set(DEFAULT_PATCH))
        if unknown:
            raise ConfigError(
                f"data.patch.{unknown[0]}: not a patch option (the options are {', '.join(DEFAULT_PATCH)})"
            )
        merged = {**DEFAULT_PATCH, **given}
        size = [int(s) for s in merged["size"]] if merged["size"] is not None else None
        return cls(
            mode,
            size,
            _floats(merged["target_spacing"]),
            int(merged["num_samples"]),
            _floats(merged["pos_neg_ratio"]),
            _floats(merged["class_ratios"]),
        )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"data.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode != "patch":
            return
        if self.size is None or len(self.size) != 3 or min(self.size) < 1:
            raise ConfigError(f"data.patch.size must be three positive sizes (x, y, z), got {self.size}")
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

    @property
    def active(self) -> bool:
        """Whether training runs on patches (``data.mode=patch``)."""
        return self.mode == "patch"


@dataclass(frozen=True)
class NormalizationSettings:
    """How image intensities are normalised (``data.normalize``, ``data.intensity``; see
    ``seglight.data.normalization``): one mode, or one per channel, and the intensity statistics ``ct`` needs."""

    normalize: str | list[str]
    intensity: dict[str, list[float | None]] | None  # low, high, mean, std: one value per channel

    @classmethod
    def from_options(cls, normalize: Any, intensity: Mapping[str, Any] | None) -> NormalizationSettings:
        """From the options as given: a mode or a list of modes; intensity values as numbers or lists."""
        normalize = plain(normalize)
        modes = normalize if isinstance(normalize, str) else [str(m) for m in normalize or []]
        given = plain(intensity)
        if given is not None and not isinstance(given, Mapping):
            raise ConfigError(
                f"data.intensity must be a mapping of low, high, mean, std (or null), got {given!r}"
            )
        settings = None
        if given and any(v is not None for v in given.values()):
            settings = intensity_settings(given, normalize_modes(modes, channel_count(modes, given)))
        return cls(modes, settings)

    def __post_init__(self) -> None:
        modes = normalize_modes(self.normalize, channel_count(self.normalize, self.intensity))
        intensity_settings(self.intensity, modes)  # ct channels need their statistics

    @property
    def channels(self) -> int:
        """The channels the settings are for (1 when they hold for any number)."""
        return channel_count(self.normalize, self.intensity)

    def check_channels(self, count: int) -> None:
        """ConfigError unless settings made per channel (a list of modes, intensity values) fit ``count``."""
        per_channel = not isinstance(self.normalize, str) or self.intensity is not None
        if per_channel and self.channels != count:
            raise ConfigError(
                f"data.normalize / data.intensity give {self.channels} channel(s) but the images have {count}: "
                "give one value per channel"
            )


@dataclass(frozen=True)
class CacheSettings:
    """Where preprocessed cases are kept (``data.cache``) and how much the caches may hold."""

    mode: str
    cache_dir: str | None
    gpu_cache_share: float
    cache_max_gb: float | None

    def __post_init__(self) -> None:
        if self.mode not in (*CACHE_MODES, *GPU_CACHE_MODES):
            modes = ", ".join((*CACHE_MODES, *GPU_CACHE_MODES))
            raise ConfigError(f"data.cache must be one of {modes}, got {self.mode!r}")
        if not 0.0 < self.gpu_cache_share <= 1.0:
            raise ConfigError(
                f"data.gpu_cache_share must be above 0 and at most 1, got {self.gpu_cache_share}"
            )
        if self.cache_max_gb is not None and self.cache_max_gb <= 0:
            raise ConfigError(
                f"data.cache_max_gb must be a positive number of GB (or null), got {self.cache_max_gb}"
            )

    @property
    def preprocessed_dir(self) -> Path:
        """Folder of the ``disk`` preprocessing cache."""
        return Path(self.cache_dir or default_cache_dir() / "preprocessed").expanduser()


@dataclass(frozen=True)
class LayoutSettings:
    """Where the cases come from and how they are laid out: the training source, the validation source, the
    label names declared beside them, and how remote files are fetched."""

    root: str | None
    datalist: Any  # a datalist file's path, an inline list of entries, or None
    demo: dict[str, Any] | None
    layout: str
    image_key: str | list[str]
    label_key: str
    image_pattern: str | list[str]
    label_pattern: str
    val_root: str | None
    val_datalist: Any
    labels: dict[Any, Any] | None
    remote: dict[str, Any]
    dicom_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.root is None and self.datalist is None and self.demo is None:
            raise ConfigError(
                "no data given: set data.root=<folder with dataset.json> (data=msd) or use data=demo"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @property
    def has_val_source(self) -> bool:
        """Whether validation cases come from a source of their own (``val_root`` / ``val_datalist``)."""
        return self.val_root is not None or self.val_datalist is not None

    @property
    def val_source(self) -> str:
        """The validation source as the split file and messages name it."""
        return str(self.val_datalist or self.val_root)

    def remote_cache(self) -> RemoteCache:
        """The fetcher of ``s3://`` objects (``data.remote``); credentials in the options are a ConfigError."""
        return RemoteCache(
            cache_dir=Path(self.remote.get("cache_dir") or default_cache_dir() / "remote"),
            endpoint_url=self.remote.get("endpoint_url"),
            options=self.remote.get("options") or {},
        )

    @property
    def dicom_dir(self) -> Path:
        """Where DICOM series among the images are converted to NIfTI (``data.dicom_cache_dir``)."""
        return Path(self.dicom_cache_dir or default_cache_dir() / "dicom").expanduser()

    def local_or_url(self, path: str | None) -> str | None:
        """``path`` with ``~`` expanded, unless it is a URL."""
        return path if path is None or is_remote(path) else str(Path(path).expanduser())


@dataclass(frozen=True)
class SplitSettings:
    """How cases are split into training and validation: a seeded hold-out share, or one fold of k."""

    val_fraction: float
    split_seed: int
    split_path: str | None
    fold: int | None
    num_folds: int
    splits_path: str | None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.num_folds < 2:
            raise ConfigError(f"data.num_folds must be at least 2, got {self.num_folds}")
        if self.fold is not None and not 0 <= self.fold < self.num_folds:
            raise ConfigError(
                f"data.fold must be between 0 and data.num_folds-1 ({self.num_folds - 1}), got {self.fold}"
            )


@dataclass(frozen=True)
class DataSettings:
    """All of a data module's settings: its parts, the transforms' settings, batches, bad cases and the seed."""

    layout: LayoutSettings
    split: SplitSettings
    cache: CacheSettings
    patch: PatchSettings
    spatial_size: list[int]
    a_min: float
    a_max: float
    normalization: NormalizationSettings
    orientation: str | None
    batch_size: int
    num_workers: int  # as asked for; the data module uses at most the CPUs it may use
    on_bad_case: str
    skipped_path: str | None
    seed: int

    def __post_init__(self) -> None:
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ConfigError(
                f"data.spatial_size must be three positive sizes (x, y, z), got {self.spatial_size}"
            )
        if self.a_max <= self.a_min:
            raise ConfigError(f"data.a_max ({self.a_max}) must be greater than data.a_min ({self.a_min})")
        if self.on_bad_case not in BAD_CASE_ACTIONS:
            raise ConfigError(
                f"data.on_bad_case must be one of {', '.join(BAD_CASE_ACTIONS)}, got {self.on_bad_case!r}"
            )
        if self.split.fold is not None and self.layout.has_val_source:
            raise ConfigError(
                "data.fold and a validation source (data.val_root / data.val_datalist) exclude each other: "
                "the validation source replaces the split"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")

    @classmethod
    def from_options(cls, **options: Any) -> DataSettings:
        """The settings of ``SegDataModule(**options)`` (its constructor's arguments, the ``data.*`` keys)."""
        o = {key: plain(value) for key, value in options.items()}
        layout = LayoutSettings(
            root=o["root"],
            datalist=o["datalist"],
            demo=o["demo"],
            layout=o["layout"],
            image_key=o["image_key"],
            label_key=o["label_key"],
            image_pattern=o["image_pattern"],
            label_pattern=o["label_pattern"],
            val_root=o["val_root"],
            val_datalist=o["val_datalist"],
            labels=o["labels"],
            remote=o["remote"] or {},
            dicom_cache_dir=o.get("dicom_cache_dir"),
        )
        split = SplitSettings(
            val_fraction=float(o["val_fraction"]),
            split_seed=int(o["split_seed"]),
            split_path=o["split_path"],
            fold=None if o["fold"] is None else int(o["fold"]),
            num_folds=int(o["num_folds"]),
            splits_path=o["splits_path"],
        )
        cache = CacheSettings(
            mode=o["cache"],
            cache_dir=o["cache_dir"],
            gpu_cache_share=float(o["gpu_cache_share"]),
            cache_max_gb=None if o["cache_max_gb"] is None else float(o["cache_max_gb"]),
        )
        return cls(
            layout=layout,
            split=split,
            cache=cache,
            patch=PatchSettings.from_options(o["mode"], o["patch"]),
            spatial_size=[int(s) for s in o["spatial_size"]],
            a_min=float(o["a_min"]),
            a_max=float(o["a_max"]),
            normalization=NormalizationSettings.from_options(o["normalize"], o["intensity"]),
            orientation=o["orientation"],
            batch_size=int(o["batch_size"]),
            num_workers=int(o["num_workers"]),
            on_bad_case=o["on_bad_case"],
            skipped_path=o["skipped_path"],
            seed=int(o["seed"]),
        )


def prediction_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What prediction needs to read new scans and preprocess them as training did: the image key(s), the layout
    (subject-folder patterns, the datalist trained on and its root) and the deterministic transforms' settings.

    ``settings``: a data module's hyperparameters (the ``data.*`` keys, as checkpoints save them), or prediction
    settings made by this function (as saved with a module), which come back unchanged.
    """
    given = plain(dict(settings))
    if "patch" in given:  # a data module's settings: resampling is one of patch mode's settings
        given["target_spacing"] = (given["patch"] or {}).get(
            "target_spacing", DEFAULT_PATCH["target_spacing"]
        )
    result = {"image_key": given.get("image_key", "image")}
    # How the training data was laid out, so new scans laid out alike are read alike (seglight.prediction.inputs).
    for key in INPUT_KEYS:
        if given.get(key) is not None:
            result[key] = given[key]
    if isinstance(given.get("datalist"), str) and given.get("root"):
        result["datalist"], result["root"] = given["datalist"], given["root"]
    result.update({key: given[key] for key in PREPROCESSING_KEYS if key in given})
    if result.get("mode", "resize") != "patch":
        result.pop("target_spacing", None)  # resampling is patch mode's
    return result


def _floats(value: Sequence[Any] | None) -> list[float] | None:
    return [float(v) for v in value] if value is not None else None
