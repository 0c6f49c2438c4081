"""What a data module's dataset holds: its cases (the training source, then the validation source), its
dataset.json, label names and values, input channels, what the network sees, the remote files fetched and the DICOM
series converted, and the check of every case. Read once, on demand; all but the fetching, the conversion and the
check work before setup.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglight.core.errors import ConfigError, DataError, SeglightError
from seglight.core.io import load_nifti
from seglight.data.caching.files import hold
from seglight.data.check_report import DatasetReport, Finding
from seglight.data.checks import inspect_cases
from seglight.data.datalists import (
    IMAGE,
    LABEL,
    Case,
    declared_channels,
    declared_label_values,
    declared_labels,
    read_datalist_file,
    read_dataset_json,
    resolve_datalist,
)
from seglight.data.demo import demo_root
from seglight.data.dicom import dicom_volume, entry_volumes, is_series_entry
from seglight.data.folders import IncompleteCase
from seglight.data.layouts import DATASET, SUBJECTS, SubjectPatterns, dataset_cases, find_layout, meta_beside
from seglight.data.remote import RemoteCache, is_remote, localize_paths
from seglight.data.settings import DataSettings, LayoutSettings
from seglight.data.transforms import oriented_geometry, resampled_shape

log = logging.getLogger("seglight")


@dataclass(frozen=True)
class NetworkInput:
    """What the network sees: the builder sizes and checks the network from it."""

    size: list[int]  # voxels (x, y, z) of one input
    option: str  # the option that sets the size, for messages
    spacing: list[float] | None  # mm per voxel at that size; None when unknown (remote or unreadable data)
    sliding_window: bool  # whole volumes are segmented by sliding windows of `size` (validation, prediction)


@dataclass
class SourceCases:
    """The cases of one source, its dataset.json (or datalist keys), and case folders that cannot be used."""

    cases: list[Case]
    meta: dict[str, Any] = field(default_factory=dict)
    incomplete: list[IncompleteCase] = field(default_factory=list)


def read_source(
    root: str | Path | None,
    datalist: Any,
    settings: LayoutSettings,
    store: RemoteCache,
    others: Sequence[Case] = (),
    option: str = "data.root",
) -> SourceCases:
    """The cases of one source: a datalist (a file, or inline; paths relative to ``root``), else what ``root``
    holds, as ``data.layout`` says: subject folders (``folder``), or a dataset (``auto``, ``msd``, ``nnunet``).

    ``others``: the cases of another source of the same dataset (the training cases, when reading a validation
    source), so that cases named by their paths are named alike in both. ``option`` names ``root`` in messages.
    """
    image_key, label_key = settings.image_key, settings.label_key
    if isinstance(datalist, str):
        cases, meta = read_datalist_file(datalist, root, image_key, label_key, store, others)
        return SourceCases(cases, meta)
    if datalist is not None:
        cases = resolve_datalist(datalist, root, image_key, label_key, others=others)
        return SourceCases(cases, meta_beside(root, store))
    if root is None:
        raise DataError("no data given: set data.root (or data.datalist)")
    kind = SUBJECTS if settings.layout == "folder" else DATASET
    patterns = SubjectPatterns(settings.image_pattern, settings.label_pattern)
    found = find_layout(root, (kind,), name=f"{option} {root}", store=store, subjects=patterns)
    if found.subjects is not None:
        return SourceCases(found.subjects.cases, meta_beside(root, store), found.subjects.incomplete)
    return SourceCases(dataset_cases(found, image_key, label_key, store, settings.layout, others), found.meta)


class Catalog:
    """The dataset of a data module's settings, read on first use.

    Args:
        settings: the data module's settings.
        store: reads and fetches remote files.
    """

    def __init__(self, settings: DataSettings, store: RemoteCache) -> None:
        self.settings = settings
        self.layout = settings.layout
        self.store = store
        self.incomplete: list[IncompleteCase] = []  # case folders with a missing or extra file
        self.val_ids: set[str] | None = None  # the validation source's case ids, when there is one
        self._cases: list[Case] | None = None
        self._meta: dict[str, Any] | None = None
        self._localized: tuple[list[Case], dict[str, str], list[Finding]] | None = None

    @property
    def root(self) -> Path | str | None:
        """The dataset folder: the demo's cache folder, or ``root`` (an ``s3://`` URL stays a string)."""
        if self.layout.demo is not None:
            return demo_root(**self.layout.demo)
        if self.layout.root is None:
            return None
        return str(self.layout.root) if is_remote(self.layout.root) else Path(self.layout.root).expanduser()

    def read_cases(self) -> list[Case]:
        """All cases (training source, then validation source), with absolute paths or URLs; read once.

        Case folders with a missing or extra file are not among them (``incomplete``): ``inspect`` reports them.
        """
        if self._cases is None:
            train = read_source(self.root, self.layout.datalist, self.layout, self.store)
            cases, incomplete = list(train.cases), list(train.incomplete)
            if self.layout.has_val_source:
                val_root = self.layout.local_or_url(self.layout.val_root)
                val = read_source(
                    val_root, self.layout.val_datalist, self.layout, self.store, train.cases, "data.val_root"
                )
                _refuse_shared_ids(train, val, self.layout.val_source)
                self.val_ids = {c["case_id"] for c in val.cases} | {c.case_id for c in val.incomplete}
                cases += val.cases
                incomplete += val.incomplete
            self._cases, self.incomplete, self._meta = cases, incomplete, train.meta
        return [dict(case) for case in self._cases]

    def dataset_meta(self) -> dict[str, Any]:
        """dataset.json (or a JSON datalist's keys besides ``training``); empty when there is none yet."""
        if self._meta is None:
            try:
                if isinstance(self.layout.datalist, str) or self.layout.layout == "folder":
                    self.read_cases()
                else:
                    self._meta = read_dataset_json(self.root, self.store) if self.root else {}
            except SeglightError:
                return {}  # not there yet (the demo before generation) or unreadable: setup says why
        return dict(self._meta or {})

    @property
    def label_names(self) -> dict[int, str]:
        """Label values and names (background included): ``data.labels``, else dataset.json's ``labels``.

        Reads MSD's ``{"0": "background"}`` and nnU-Net v2's ``{"background": 0}``; cheap, works before setup.
        """
        if self.layout.labels:
            return declared_labels({"labels": self.layout.labels})
        return declared_labels(self.dataset_meta())

    def declared_label_values(self) -> set[int]:
        """Every label value the dataset declares (``data.labels``, else dataset.json's, regions included)."""
        meta = {"labels": self.layout.labels} if self.layout.labels else self.dataset_meta()
        return set(self.label_names) | declared_label_values(meta)

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
            path = self.store.fetch(image) if is_remote(image) else image
            shape = load_nifti(path).shape
        except Exception:  # unreadable: the check at setup names the file
            return 1
        return int(shape[3]) if len(shape) == 4 else 1

    def network_input(self) -> NetworkInput:
        """What the network sees: its input size (and the option that sets it), the voxel spacing at that size,
        and whether whole volumes are segmented by sliding windows; works before setup.

        Resize mode: ``spatial_size``, at the first case's spacing scaled by the resizing. Patch mode:
        ``patch.size`` at ``patch.target_spacing`` (or the first case's own spacing), by sliding windows.
        """
        patch, spatial_size = self.settings.patch, self.settings.spatial_size
        if patch.active:
            spacing = patch.target_spacing or self.first_case_geometry()[1]
            return NetworkInput(list(patch.size or []), "data.patch.size", spacing, True)
        shape, spacing = self.first_case_geometry()
        if shape is not None and spacing is not None:
            spacing = [s * n / m for s, n, m in zip(spacing, shape, spatial_size, strict=True)]
        return NetworkInput(list(spatial_size), "data.spatial_size", spacing, False)

    def first_case_geometry(self) -> tuple[list[int] | None, list[float] | None]:
        """(shape, spacing) of the first case's image after reorientation, from its header; Nones if unknown."""
        try:
            image = self.read_cases()[0][IMAGE]
            path = image[0] if isinstance(image, list) else image
            if is_remote(path):
                return None, None  # not fetched yet: nothing is downloaded just to size the network
            if is_series_entry(path):  # a DICOM series: converted now rather than at setup, and read the same
                path = str(dicom_volume(path, self.store, self.layout.dicom_dir))
            return oriented_geometry(str(path), self.settings.orientation)
        except (SeglightError, IndexError, OSError):  # no data yet (the demo before generation) or unreadable
            return None, None

    def localized_cases(self) -> tuple[list[Case], dict[str, str], list[Finding]]:
        """The cases with every remote file replaced by its local copy (fetched now unless cached), and every image
        entry that is a DICOM series (a folder, ``s3://`` prefix or ``.zip``) by its NIfTI volume (converted now
        unless cached, ``seglight.data.dicom``), so that every reader and check sees NIfTI files.

        Returns the cases, what each local file stands for (a URL, a series folder: to name it in messages) and a
        finding for each object that could not be fetched and each series that is no volume. A problem every
        object would share (bucket, credentials) raises.
        """
        if self._localized is not None:
            return self._localized
        cases = self.read_cases()
        series = list(dict.fromkeys(p for case in cases for p in _image_paths(case) if is_series_entry(p)))
        urls = [p for case in cases for p in _paths_of(case) if is_remote(p) and p not in series]
        if not urls and not series:
            self._localized = (cases, {}, [])
            return self._localized
        fetched: dict[str, Path] = {}
        problems: dict[str, str] = {}
        if urls:
            hold(self.store.cache_dir)  # pruning keeps what this run fetches or reuses
            fetched, problems = self.store.fetch_all(urls)
            log.info(
                "Remote files: %d of %d fetched now (%.1f MB); cache %s",
                self.store.downloaded,
                len(set(urls)),
                self.store.downloaded_bytes / 1e6,
                self.store.usage(),
            )
        if series:
            converted, unconverted = entry_volumes(series, self.store, self.layout.dicom_dir)
            volumes = {path: volume for path, (_, volume) in converted.items()}
            fetched, problems = {**fetched, **volumes}, {**problems, **unconverted}
            log.info("DICOM series: %d of %d converted to NIfTI volumes", len(converted), len(series))
        findings = []
        for index, case in enumerate(cases):
            for path in _paths_of(case):
                if path in problems:
                    message = problems[path].removeprefix(f"{path}: ")
                    findings.append(Finding("error", path, message, index))
            case[IMAGE] = localize_paths(case[IMAGE], fetched)
            case[LABEL] = localize_paths(case[LABEL], fetched)
        self._localized = (cases, {str(path): source for source, path in fetched.items()}, findings)
        return self._localized

    def inspect(
        self, full: bool = False, workers: int = 1, num_classes: int | None = None
    ) -> tuple[list[Case], DatasetReport]:
        """Read every case, fetch remote files, and check them: headers only, or every voxel with ``full``.

        Returns the cases (local paths; a case folder with a missing or extra file only as its ``case_id``) and
        the report. ``num_classes``: the model's, which label values must stay below.
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
            workers=workers,
            exclude=unfetched,
            num_classes=num_classes,
        )
        report.findings[:0] = fetch_findings
        # Case folders with a missing or extra file count as bad cases, numbered after the readable ones; their
        # ids stay in the returned cases, so the split covers them and skipping one never reshuffles it.
        for number, incomplete in enumerate(self.incomplete, start=len(cases)):
            report.findings += [Finding("error", incomplete.where, p, number) for p in incomplete.problems]
        report.num_cases += len(self.incomplete)
        return cases + [{"case_id": i.case_id} for i in self.incomplete], report

    def check_patch_fits(self, cases: Sequence[Case]) -> None:
        """Patch mode: ConfigError unless every volume, once resampled, is at least the patch size (from headers).

        Also checks that ``class_ratios`` has one entry per label class of the dataset.
        """
        patch = self.settings.patch
        if not patch.active:
            return
        names = self.label_names
        if patch.class_ratios is not None and names and len(patch.class_ratios) != len(names):
            raise ConfigError(
                f"data.patch.class_ratios has {len(patch.class_ratios)} entries but the dataset has {len(names)} "
                f"label classes ({', '.join(f'{v} {n}' for v, n in sorted(names.items()))}): give one ratio per "
                "class"
            )
        shapes: dict[str, list[int]] = {}
        for case in cases:
            path = case[IMAGE][0] if isinstance(case[IMAGE], list) else case[IMAGE]
            if "://" in str(path):
                continue  # remote files are checked when fetched; padding keeps the crops valid
            shape, spacing = oriented_geometry(str(path), self.settings.orientation)
            if patch.target_spacing is not None:
                shape = resampled_shape(shape, spacing, patch.target_spacing)
            shapes[case["case_id"]] = shape
        size = patch.size or []
        too_small = [c for c, shape in shapes.items() if any(p > n for p, n in zip(size, shape, strict=True))]
        if not too_small:
            return
        smallest = [min(shape[axis] for shape in shapes.values()) for axis in range(3)]
        culprit = f"{too_small[0]} ({shapes[too_small[0]]} voxels)"
        if len(too_small) > 1:
            culprit += f" and {len(too_small) - 1} more"
        where = (
            f"at data.patch.target_spacing={patch.target_spacing} mm"
            if patch.target_spacing
            else "at its own spacing"
        )
        raise ConfigError(
            f"data.patch.size={patch.size} is larger than the volume: case {culprit} {where}; "
            f"use data.patch.size no larger than {smallest} (the smallest volume), or a finer "
            "data.patch.target_spacing"
        )


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


def _image_paths(case: Case) -> list[str]:
    image = case[IMAGE]
    return [str(v) for v in image] if isinstance(image, list) else [str(image)]


def _paths_of(case: Case) -> list[str]:
    files: list[str] = []
    for key in (IMAGE, LABEL):
        value = case[key]
        files.extend(str(v) for v in value) if isinstance(value, list) else files.append(str(value))
    return files
