"""The dataset fingerprint: what planning needs to know about a dataset, read once through seglight's data module.

Every per-axis value is (x, y, z) after reorientation to the data module's orientation (RAS by default), as the
training pipeline sees the scans. The fingerprint is JSON-ready (``to_dict``) and reads back (``from_dict``), so
a plan can be made again from a saved ``fingerprint.json`` without reading the data.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seglight.core.errors import DataError
from seglight.planning.cases import FOREGROUND_SAMPLES, PERCENTILES, CaseStats, read_case

log = logging.getLogger("seglight")

FINGERPRINT_VERSION = 1
AXES = ("x", "y", "z")
# Foreground samples per channel kept for the pooled statistics (cases share it evenly).
MAX_POOLED_SAMPLES = 1_000_000
# Percentiles over cases reported for spacings and shapes.
CASE_PERCENTILES = (0, 5, 10, 50, 90, 95, 100)
# A channel whose images go this far below 0 at their 0.5th percentile holds air in Hounsfield units: CT.
CT_AIR_BELOW = -500.0


@dataclass
class ChannelInfo:
    """One image channel: its modality (and where that came from) and its intensity statistics."""

    index: int
    modality: str  # "CT", a declared name ("MRI", "T2", "ADC"...), or "other" when guessed to be not CT
    source: str  # "dataset.json", or how it was guessed
    foreground: dict[str, float]  # pooled voxels inside the labels: mean, std, min, max, PERCENTILES
    image: dict[str, float]  # whole images: median over cases of their PERCENTILES, min and max over cases


@dataclass
class Fingerprint:
    """A dataset described for planning; see ``to_dict`` for the JSON form."""

    source: dict[str, Any]  # root, layout, datalist: where the cases came from
    cases: list[CaseStats]
    channels: list[ChannelInfo]
    label_names: dict[int, str]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # bad cases left out (data.on_bad_case=skip)
    seconds: float = 0.0  # wall time of reading the dataset
    workers: int = 1

    @property
    def num_cases(self) -> int:
        """Cases read (bad cases left out)."""
        return len(self.cases)

    def spacings(self) -> np.ndarray:
        """``(cases, 3)`` voxel spacings in mm."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64).reshape(-1, 3)

    def shapes(self) -> np.ndarray:
        """``(cases, 3)`` shapes in voxels."""
        return np.array([c.shape for c in self.cases], dtype=np.float64).reshape(-1, 3)

    def cropped_shapes(self) -> np.ndarray:
        """``(cases, 3)`` shapes of the non-zero regions in voxels."""
        return np.array([c.cropped_shape for c in self.cases], dtype=np.float64).reshape(-1, 3)

    def median_kept_fraction(self) -> float:
        """Median share of a volume inside its non-zero region (nnU-Net's test for normalising inside it)."""
        return float(np.median([c.kept_fraction for c in self.cases])) if self.cases else 1.0

    def anisotropy(self) -> dict[str, Any]:
        """The ratio of the coarsest to the finest median spacing, and the coarsest axis."""
        median = np.median(self.spacings(), axis=0)
        return {
            "ratio": round(float(median.max() / median.min()), 3),
            "coarse_axis": AXES[int(np.argmax(median))],
            "fine_axis": AXES[int(np.argmin(median))],
        }

    def orientations(self) -> dict[str, int]:
        """Axis codes of the files as stored -> number of cases."""
        return dict(Counter(c.orientation for c in self.cases).most_common())

    def label_statistics(self) -> dict[int, dict[str, Any]]:
        """Per foreground label: voxel share, cases holding it, components per case and object sizes in mm."""
        total = sum(math.prod(c.shape) for c in self.cases) or 1
        values = sorted(
            {v for c in self.cases for v in c.label_voxels if v > 0} | set(self.label_names) - {0}
        )
        stats: dict[int, dict[str, Any]] = {}
        for value in values:
            present = [c for c in self.cases if c.label_voxels.get(value)]
            objects = [c.objects[value] for c in present if value in c.objects]
            largest = np.array([o["extents_mm"][0] for o in objects if o["extents_mm"]]).reshape(-1, 3)
            volumes = [o["volumes_mm3"][0] for o in objects if o["volumes_mm3"]]
            smallest_kept = [min(o["volumes_mm3"]) for o in objects if o["volumes_mm3"]]
            components = [o["components"] for o in objects]
            stats[value] = {
                "name": self.label_names.get(value, f"label {value}"),
                "voxel_share": sum(c.label_voxels.get(value, 0) for c in self.cases) / total,
                "cases_with": len(present),
                "components_median": float(np.median(components)) if components else 0.0,
                "components_max": int(max(components, default=0)),
                "specks": int(sum(o["specks"] for o in objects)),
                # The largest component of each case: the object itself, specks of label noise aside.
                "largest_extent_mm": _axis_percentiles(largest) if len(largest) else None,
                "largest_volume_mm3_median": float(np.median(volumes)) if volumes else 0.0,
                "smallest_volume_mm3": float(min(smallest_kept)) if smallest_kept else 0.0,
            }
        return stats

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: summaries first (what a person reads), then every case."""
        return {
            "version": FINGERPRINT_VERSION,
            "axes": list(AXES),
            "source": self.source,
            "num_cases": self.num_cases,
            "read_seconds": round(self.seconds, 2),
            "workers": self.workers,
            "spacing_mm": _axis_percentiles(self.spacings()),
            "shape": _axis_percentiles(self.shapes()),
            "cropped_shape": _axis_percentiles(self.cropped_shapes()),
            "median_kept_fraction": round(self.median_kept_fraction(), 4),
            "anisotropy": self.anisotropy() if self.cases else None,
            "orientations": self.orientations(),
            "channels": [vars(c) for c in self.channels],
            "labels": {str(k): v for k, v in self.label_statistics().items()},
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "skipped": self.skipped,
            "cases": [c.to_dict() for c in self.cases],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        """A fingerprint as ``to_dict`` wrote it (``fingerprint.json``)."""
        if int(data.get("version", 0)) != FINGERPRINT_VERSION:
            raise DataError(
                f"fingerprint version {data.get('version')!r} is not {FINGERPRINT_VERSION}: plan the dataset "
                "again (python -m seglight.plan)"
            )
        return cls(
            source=dict(data.get("source") or {}),
            cases=[CaseStats.from_dict(c) for c in data["cases"]],
            channels=[ChannelInfo(**c) for c in data["channels"]],
            label_names={int(k): str(v) for k, v in (data.get("label_names") or {}).items()},
            skipped=list(data.get("skipped") or []),
            seconds=float(data.get("read_seconds", 0.0)),
            workers=int(data.get("workers", 1)),
        )


def fingerprint_dataset(datamodule: Any, samples: int = FOREGROUND_SAMPLES) -> Fingerprint:
    """Read every case of a ``SegDataModule`` once (remote files fetched into its cache) and fingerprint it.

    The data module's header check (``inspect``) runs first: with ``data.on_bad_case=error`` a bad case stops
    planning with its message, with ``skip`` it is left out and listed. Cases are read in
    ``data.num_workers`` threads, one volume at a time each.
    """
    started = time.perf_counter()
    if datamodule.demo is not None:
        datamodule.prepare_data()  # the demo is generated on first use
    workers = max(1, int(datamodule.num_workers))
    cases, report = datamodule.inspect(full=False, workers=workers)
    bad = report.bad_cases()
    if bad and datamodule.settings.on_bad_case == "error":
        report.raise_for_errors()
    skipped = [{"case_id": cases[i].get("case_id"), "problems": bad[i]} for i in sorted(bad)]
    good = [case for i, case in enumerate(cases) if i not in bad]
    _, names, _ = datamodule.catalog.localized_cases()
    per_case = max(100, min(samples, MAX_POOLED_SAMPLES // max(1, len(good))))

    def one(index: int) -> CaseStats | str:
        try:
            return read_case(good[index], datamodule.settings.orientation, per_case, seed=(index,))
        except DataError as err:
            message = str(err)
            for local, url in names.items():  # name downloaded files by their URL
                message = message.replace(local, url)
            return message

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, range(len(good))))
    failed = [(good[i]["case_id"], r) for i, r in enumerate(results) if isinstance(r, str)]
    if failed and datamodule.settings.on_bad_case == "error":
        raise DataError(
            failed[0][1] if len(failed) == 1 else f"{len(failed)} cases cannot be used: {failed[0][1]}"
        )
    skipped += [{"case_id": case_id, "problems": [message]} for case_id, message in failed]
    stats = [r for r in results if isinstance(r, CaseStats)]
    if not stats:
        raise DataError("no case of the dataset could be read: nothing to plan from")
    meta = datamodule.catalog.dataset_meta()
    channels = describe_channels(stats, meta)
    source = {
        k: str(v)
        for k, v in (("root", datamodule.catalog.root), ("layout", datamodule.settings.layout.layout))
        if v is not None
    }
    fingerprint = Fingerprint(
        source=source,
        cases=stats,
        channels=channels,
        label_names=dict(datamodule.label_names),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        workers=workers,
    )
    log.info("Fingerprint: %d cases read in %.1f s (%d threads)", len(stats), fingerprint.seconds, workers)
    return fingerprint


def describe_channels(stats: Sequence[CaseStats], meta: Mapping[str, Any]) -> list[ChannelInfo]:
    """Each channel's modality (dataset.json's ``modality``/``channel_names``, else guessed) and statistics."""
    count = max(c.channels for c in stats)
    declared = meta.get("modality") or meta.get("channel_names") or {}
    declared = {int(k): str(v) for k, v in dict(declared).items()} if isinstance(declared, Mapping) else {}
    channels = []
    for index in range(count):
        pooled = [c.samples[index] for c in stats if len(c.samples) > index and c.samples[index].size]
        image = [c.image[index] for c in stats if len(c.image) > index]
        whole = {
            "min": min(i["min"] for i in image),
            "max": max(i["max"] for i in image),
            **{f"p{p:g}": float(np.median([i[f"p{p:g}"] for i in image])) for p in PERCENTILES},
        }
        if index in declared:
            modality, source = declared[index], "dataset.json"
        elif whole["p0.5"] <= CT_AIR_BELOW:
            modality = "CT"
            source = (
                f"guessed from intensities: the images' 0.5th percentile is {whole['p0.5']:.4g}, air in HU"
            )
        else:
            modality = "other"
            source = (
                f"guessed from intensities: no air in Hounsfield units (the images' 0.5th percentile is "
                f"{whole['p0.5']:.4g}, above {CT_AIR_BELOW:g}), so not CT"
            )
        channels.append(
            ChannelInfo(
                index,
                modality,
                source,
                foreground_statistics(pooled),
                {k: round(v, 4) for k, v in whole.items()},
            )
        )
    return channels


def foreground_statistics(samples: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean, std, min, max and PERCENTILES of pooled foreground voxels; zeros when there are none."""
    keys = ["mean", "std", "min", "max", *(f"p{p:g}" for p in PERCENTILES), "samples"]
    if not samples:
        return dict.fromkeys(keys, 0.0)
    values = np.concatenate(samples).astype(np.float64)
    stats = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)},
    }
    return {**{k: round(v, 4) for k, v in stats.items()}, "samples": int(values.size)}


def is_ct(modality: str) -> bool:
    """Whether a modality name is CT (dataset.json's ``CT``, ``ct``, ``CT scan``...)."""
    return modality.strip().upper().split()[0:1] == ["CT"] if modality.strip() else False


def _axis_percentiles(values: np.ndarray) -> dict[str, list[float]]:
    """Per-axis percentiles over cases: ``min``, ``p5``, ``p10``, ``median``, ``p90``, ``p95``, ``max``."""
    names = {0: "min", 50: "median", 100: "max"}
    result = {}
    for q in CASE_PERCENTILES:
        row = np.percentile(values, q, axis=0)
        result[names.get(q, f"p{q}")] = [round(float(v), 4) for v in row]
    return result
