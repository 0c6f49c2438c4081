"""Scoring predicted masks against ground truth (the library behind ``python -m seglight.evaluate``).

``evaluate`` writes ``metrics.csv`` (one row per case: Dice, HD95 in mm, predicted and true volume in ml, per
label) and ``metrics_summary.json``; cases missing on either side are listed in both. With
``determine_postprocessing`` it also scores each label with only its largest connected component kept and
writes ``postprocessing.json`` naming the labels where that raised the mean Dice (nnU-Net's rule), which
``seglight.predict`` takes as ``postprocess.largest_component=<file>``. ``evaluate_after_training`` predicts a
run's held-out cases with its best checkpoint and scores them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from seglight.core.errors import DataError
from seglight.core.geometry import same_grid, spacing_from_affine
from seglight.core.io import atomic_write_text, load_nifti, read_array
from seglight.data import SegDataModule
from seglight.data.datalists import IMAGE
from seglight.data.folders import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN
from seglight.evaluation.ground_truth import ground_truth, masks_in_folder
from seglight.models.metrics import hd95_mm
from seglight.prediction.cases import predict_cases
from seglight.prediction.inputs import InputCase
from seglight.prediction.postprocessing import keep_largest_component, write_plan
from seglight.prediction.predictor import Predictor
from seglight.training.checkpoints import trained_checkpoint

log = logging.getLogger("seglight")

OK, MISSING_PRED, MISSING_GT = "ok", "missing prediction", "missing ground truth"
METRICS = ("dice", "hd95_mm", "pred_ml", "true_ml")


# -- one pair of masks ---------------------------------------------------------------------------------------------


def label_metrics(pred: np.ndarray, gt: np.ndarray, affine: np.ndarray, label: int) -> dict[str, float]:
    """Dice, HD95 (mm), predicted and true volume (ml) of one label value in two masks on the same grid.

    Empty masks follow training's validation metrics (``seglight.models.metrics.hd95_mm``): a label absent from both
    has nothing to measure (Dice and HD95 NaN, left out of means); a label in only one of them has Dice 0 and
    HD95 the length of the volume's diagonal, the largest distance it allows, so a missed structure is never
    rewarded.
    """
    p, g = pred == label, gt == label
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    n_pred, n_true = int(p.sum()), int(g.sum())
    result = {"pred_ml": n_pred * voxel_ml, "true_ml": n_true * voxel_ml}
    if n_pred == 0 and n_true == 0:
        return {"dice": math.nan, "hd95_mm": math.nan, **result}
    dice = 2.0 * int(np.logical_and(p, g).sum()) / (n_pred + n_true)
    spacing = spacing_from_affine(affine).tolist()
    hd95 = hd95_mm(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None], [spacing])
    return {"dice": dice, "hd95_mm": float(hd95[0, 0]), **result}


# -- the whole evaluation ------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Per-case rows, the labels scored, and the cases that could not be compared."""

    labels: list[int]
    label_names: dict[int, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    # Per label: mean Dice as predicted and with only the largest component kept, and whether to keep it.
    postprocessing: dict[int, dict[str, Any]] | None = None

    def cases(self, status: str) -> list[str]:
        """Cases with this status (``ok``, ``missing prediction``, ``missing ground truth`` or an error)."""
        return [r["case"] for r in self.rows if r["status"] == status]

    @property
    def problems(self) -> list[dict[str, Any]]:
        """Rows that were not scored, whatever the reason."""
        return [r for r in self.rows if r["status"] != OK]

    def summary(self) -> dict[str, Any]:
        """Mean, std and count (NaN left out) of each metric per label, over the scored cases."""
        scored = [r for r in self.rows if r["status"] == OK]
        per_label: dict[str, Any] = {}
        for label in self.labels:
            stats = {}
            for metric in METRICS:
                values = np.array([r[f"{metric}_{label}"] for r in scored], dtype=np.float64)
                values = values[~np.isnan(values)]
                stats[metric] = {
                    "mean": float(values.mean()) if values.size else None,
                    "std": float(values.std()) if values.size else None,
                    "n": int(values.size),
                }
            per_label[str(label)] = {"name": self.label_names.get(label, f"label {label}"), **stats}
        summary: dict[str, Any] = {
            "cases": len(scored),
            "labels": per_label,
            MISSING_PRED: self.cases(MISSING_PRED),
            MISSING_GT: self.cases(MISSING_GT),
            "errors": {
                r["case"]: r["status"] for r in self.problems if r["status"] not in (MISSING_PRED, MISSING_GT)
            },
        }
        if self.postprocessing is not None:
            summary["largest_component"] = {str(k): v for k, v in self.postprocessing.items()}
        return summary

    def postprocessing_labels(self) -> list[int]:
        """The labels whose mean Dice keeping only the largest component raised (empty before it is scored)."""
        return sorted(k for k, v in (self.postprocessing or {}).items() if v["keep"])

    def csv_text(self) -> str:
        """The rows as CSV: case, status, then dice/hd95_mm/pred_ml/true_ml for each label (``dice_1``...)."""
        columns = ["case", "status"] + [f"{m}_{label}" for label in self.labels for m in METRICS]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
        return out.getvalue()

    def describe(self) -> str:
        """Mean ± std per label, then the cases that were not scored: what the command prints."""
        lines = [f"Scored {len(self.cases(OK))} case(s)."]
        for label, stats in self.summary()["labels"].items():
            lines.append(
                f"  {label} ({stats['name']}): Dice {_mean_std(stats['dice'])} | "
                f"HD95 {_mean_std(stats['hd95_mm'], ' mm')} | "
                f"volume {_mean_std(stats['pred_ml'], ' ml')} predicted, {_mean_std(stats['true_ml'], ' ml')} true"
            )
        for status in (MISSING_PRED, MISSING_GT):
            missing = self.cases(status)
            if missing:
                lines.append(f"  {status} ({len(missing)}): {', '.join(missing)}")
        for row in self.problems:
            if row["status"] not in (MISSING_PRED, MISSING_GT):
                lines.append(f"  not scored: {row['case']}: {row['status']}")
        for label, result in (self.postprocessing or {}).items():
            before, after = (_fmt(result[k]) for k in ("dice", "dice_largest_component"))
            verdict = "keep the largest component" if result["keep"] else "leave as predicted"
            name = self.label_names.get(label, f"label {label}")
            lines.append(f"  largest component of {label} ({name}): Dice {before} -> {after}: {verdict}")
        return "\n".join(lines)


def evaluate(
    pred: str | Path | Sequence[str | Path],
    gt: Any,
    output: str | Path | None = None,
    labels: Sequence[int] | None = None,
    label_key: str = "label",
    label_names: Mapping[int, str] | None = None,
    determine_postprocessing: bool = False,
    image_key: str | Sequence[str] = "image",
    image_pattern: str | Sequence[str] = DEFAULT_IMAGE_PATTERN,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
) -> Evaluation:
    """Compare every mask in ``pred`` with its ground truth; write ``metrics.csv`` and ``metrics_summary.json``.

    Args:
        pred: folder of ``<case>.nii.gz`` masks, or a list of folders (the validation folds of a
            cross-validation, each run's ``test/predictions``).
        gt: folder of ``<case>.nii.gz`` labels, a dataset (folder with ``dataset.json``, or the file), a
            .json/.csv datalist, subject folders (local or ``s3://``), or a list of cases (``case_id``, ``label``).
        output: folder for the results (default ``pred``, the first one if several).
        labels: label values to score (default: the dataset's labels, else every value present but 0).
        label_key: the labels' key in a dataset.json's or datalist's entries.
        label_names: label value -> name, for the summary (default: the dataset's).
        image_key, image_pattern, label_pattern: how the ground truth names its cases when it is a datalist or
            subject folders, as the data options of the same names in training.
        determine_postprocessing: also score each label with only its largest connected component kept, and
            write ``postprocessing.json`` naming the labels where that raises the mean Dice.
    """
    folders = [pred] if isinstance(pred, str | Path) else list(pred)
    if not folders:
        raise DataError("pred=[]: give a folder of predicted masks")
    predictions: dict[str, str] = {}
    for folder in folders:
        for case, file in masks_in_folder(folder, "pred").items():
            if case in predictions:
                raise DataError(f"pred: the case {case} is in two folders: {predictions[case]} and {file}")
            predictions[case] = file
    pred_text = str(folders[0]) if len(folders) == 1 else "[" + ",".join(map(str, folders)) + "]"
    truths, names = ground_truth(gt, label_key, image_key, image_pattern, label_pattern)
    if not isinstance(gt, str | Path):
        gt = "<the given cases>"
    names = {**names, **{int(k): str(v) for k, v in (label_names or {}).items()}}
    if not truths:
        raise DataError(f"gt={gt}: no ground-truth masks found")
    if not set(predictions) & set(truths):
        raise DataError(
            f"pred={pred_text} and gt={gt} have no case in common (predictions: {_some(predictions)}; "
            f"ground truth: {_some(truths)}); masks are matched by file name"
        )
    chosen = [int(v) for v in labels] if labels else sorted(v for v in names if v != 0)
    rows: list[dict[str, Any]] = []
    for case in sorted(set(predictions) | set(truths)):
        if case not in predictions:
            rows.append({"case": case, "status": MISSING_PRED})
        elif case not in truths:
            rows.append({"case": case, "status": MISSING_GT})
        else:
            rows.append(
                _score_case(case, predictions[case], truths[case], chosen or None, determine_postprocessing)
            )
    if not chosen:  # the dataset does not name its labels: every value found in any case
        chosen = sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r if k.startswith("dice_")}) or [1]
    for row in rows:
        if row["status"] == OK:
            for label in chosen:  # absent from both masks of this case: nothing to measure
                row.setdefault(f"dice_{label}", math.nan)
                row.setdefault(f"hd95_mm_{label}", math.nan)
                row.setdefault(f"pred_ml_{label}", 0.0)
                row.setdefault(f"true_ml_{label}", 0.0)
                if determine_postprocessing:
                    row.setdefault(f"{LARGEST}dice_{label}", math.nan)
    evaluation = Evaluation(labels=chosen, label_names={k: v for k, v in names.items()}, rows=rows)
    out = Path(output if output is not None else folders[0])
    if determine_postprocessing:
        evaluation.postprocessing = _compare_largest_component(evaluation)
        write_plan(
            out,
            evaluation.postprocessing_labels(),
            {"mean_dice": {str(k): v for k, v in evaluation.postprocessing.items()}},
        )
    atomic_write_text(out / "metrics.csv", evaluation.csv_text())
    atomic_write_text(out / "metrics_summary.json", json.dumps(evaluation.summary(), indent=2))
    return evaluation


# Row keys of the scores with only the largest component kept (not written to metrics.csv).
LARGEST = "largest_component_"


def _score_case(
    case: str, pred_file: str, gt_file: str, labels: Sequence[int] | None, largest: bool = False
) -> dict[str, Any]:
    """One row: the metrics of ``labels`` (default: every value in either mask but 0), or why it cannot be scored.

    With ``largest``, also the Dice of each label with only its largest connected component kept.
    """
    try:
        pred_img, gt_img = load_nifti(pred_file), load_nifti(gt_file)
        pred_shape, gt_shape = pred_img.shape[:3], gt_img.shape[:3]
        if pred_shape != gt_shape:
            return {
                "case": case,
                "status": f"shape differs: prediction {pred_shape}, ground truth {gt_shape}",
            }
        if not same_grid(pred_img.affine, gt_img.affine):
            return {
                "case": case,
                "status": "geometry differs: the prediction's affine is not the ground truth's (flipped or shifted?)",
            }
        p, g = _label_array(pred_img, pred_file), _label_array(gt_img, gt_file)
    except DataError as err:
        return {"case": case, "status": str(err)}
    if labels is None:
        labels = sorted((set(np.unique(p).tolist()) | set(np.unique(g).tolist())) - {0})
    row: dict[str, Any] = {"case": case, "status": OK}
    for label in labels:
        for metric, value in label_metrics(p, g, gt_img.affine, int(label)).items():
            row[f"{metric}_{int(label)}"] = value
        if largest:
            kept = keep_largest_component(p, [int(label)])
            row[f"{LARGEST}dice_{int(label)}"] = label_metrics(kept, g, gt_img.affine, int(label))["dice"]
    return row


def _compare_largest_component(evaluation: Evaluation) -> dict[int, dict[str, Any]]:
    """Per label: mean Dice over the scored cases as predicted and with the largest component kept; keep it
    where the mean rose (nnU-Net's rule: strictly better on the validation cases)."""
    scored = [r for r in evaluation.rows if r["status"] == OK]
    result: dict[int, dict[str, Any]] = {}
    for label in evaluation.labels:
        before = _nanmean([r.get(f"dice_{label}", math.nan) for r in scored])
        after = _nanmean([r.get(f"{LARGEST}dice_{label}", math.nan) for r in scored])
        keep = before is not None and after is not None and after > before
        result[label] = {"dice": before, "dice_largest_component": after, "keep": keep}
    return result


def _nanmean(values: Sequence[float]) -> float | None:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _label_array(image: Any, path: str) -> np.ndarray:
    """The mask's voxels as integer label values (3D)."""
    data = read_array(image, path)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(n == 1 for n in data.shape[3:]) else data
    if data.ndim != 3:
        raise DataError(f"{path}: a mask must be a 3D label image, this one has shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        data = np.rint(data)
    return data.astype(np.int32, copy=False)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _mean_std(stats: Mapping[str, Any], unit: str = "") -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.4g} ± {stats['std']:.3g}{unit} (n={stats['n']})"


def _some(cases: Mapping[str, str]) -> str:
    names = sorted(cases)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


# -- after training ------------------------------------------------------------------------------------------------


def evaluate_after_training(
    trainer: L.Trainer, datamodule: SegDataModule, output_dir: str | Path
) -> dict[str, Any] | None:
    """Predict the held-out cases with the best checkpoint and score them into ``<output_dir>/test/``.

    Returns the summary (also in ``test/metrics_summary.json``), or None when there is nothing to test.
    """
    if not trainer.is_global_zero:
        return None
    ckpt = trained_checkpoint(trainer)
    cases = list(datamodule.val_cases)
    if not ckpt or not cases:
        log.warning("test=true: no checkpoint or no held-out cases, nothing to test")
        return None
    folder = Path(output_dir) / "test"
    log.info("Testing %s on the %d held-out case(s) -> %s", ckpt, len(cases), folder)
    report = predict_cases(
        Predictor(ckpt), [InputCase(str(c["case_id"]), c[IMAGE]) for c in cases], folder / "predictions"
    )
    names = datamodule.label_names
    labels = sorted(int(v) for v in names if int(v) != 0) or None
    evaluation = evaluate(folder / "predictions", cases, output=folder, labels=labels, label_names=names)
    log.info("Test on held-out cases (metrics: %s):\n%s", folder / "metrics.csv", evaluation.describe())
    report.raise_for_failures()
    return evaluation.summary()
