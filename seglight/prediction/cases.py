"""Predicting a list of inputs into an output folder, one case at a time, and the report of what was written and
what failed: the work of ``python -m seglight.predict`` (and of ``seglight.evaluate``'s predictions).

Each mask is written as NIfTI (``<case>.nii.gz``) and, for a DICOM series, as a DICOM Segmentation of it
(``<case>.dcm``, ``seglight.prediction.dicom_seg``), as ``output_format`` says.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from seglight.core.errors import ConfigError, DataError, DiskFullError, find_user_error, first_line
from seglight.core.io import atomic_path
from seglight.data.caching.files import hold
from seglight.data.remote import RemoteCache, default_cache_dir, is_remote
from seglight.prediction.dicom_seg import require_highdicom, write_dicom_seg
from seglight.prediction.finished import case_stamp, is_finished, model_fingerprint, stamp
from seglight.prediction.inputs import InputCase, list_inputs
from seglight.prediction.predictor import Predictor
from seglight.training.checkpoints import model_checkpoints

log = logging.getLogger("seglight")

NIFTI, DICOM_SEG = "nifti", "dicom_seg"
OUTPUT_FORMATS = (NIFTI, DICOM_SEG)


def output_formats(value: Any) -> list[str]:
    """``output_format=`` as a list of formats, checked: ``nifti``, ``dicom_seg``, or a list of them."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
    formats = [str(item).strip().lower() for item in items if item is not None and str(item).strip()]
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise ConfigError(
            f"output_format={value}: {'not a format' if not unknown else repr(unknown[0]) + ' is not a format'}; "
            f"use {', '.join(OUTPUT_FORMATS)} or a list of them, e.g. output_format=[nifti,dicom_seg]"
        )
    return list(dict.fromkeys(formats))


def _localize(image: str | list[str], store: RemoteCache) -> str | list[str]:
    """The case's files, with remote ones fetched into the cache."""
    if isinstance(image, list):
        return [str(_localize(p, store)) for p in image]
    return str(store.fetch(image)) if is_remote(image) else image


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write ``image`` atomically (``seglight.core.io.atomic_path``): no half-written mask is ever left.

    On a full disk, the message gives the size of the compressed image (computed only then).
    """
    with atomic_path(path, size_hint=lambda: len(gzip.compress(image.to_bytes(), compresslevel=1))) as tmp:
        nib.save(image, tmp)


@dataclass
class PredictionReport:
    """What a prediction run wrote and what it could not do."""

    output: Path
    written: dict[str, Path] = field(default_factory=dict)  # case -> its mask (NIfTI, else DICOM SEG)
    failed: dict[str, str] = field(default_factory=dict)  # case -> what went wrong, naming the file
    dicom_seg: dict[str, Path] = field(default_factory=dict)  # case -> its DICOM SEG, when written
    # Masks that an earlier run of the same prediction finished, kept.
    kept: dict[str, Path] = field(default_factory=dict)

    def raise_for_failures(self) -> None:
        """A DataError naming every input that could not be predicted, if any."""
        if not self.failed:
            return
        total = len(self.failed) + len(self.written) + len(self.kept)
        lines = "\n  ".join(self.failed.values())
        raise DataError(f"{len(self.failed)} of {total} input(s) could not be predicted:\n  {lines}")


def predict_cases(
    predictor: Predictor,
    cases: Sequence[InputCase],
    output: str | Path,
    save_probabilities: bool = False,
    store: RemoteCache | None = None,
    formats: Sequence[str] = (NIFTI,),
    overwrite: bool = False,
) -> PredictionReport:
    """Predict each case into ``output/<case>.nii.gz`` (and ``output/probabilities/``), one failure at a time.

    ``formats`` (``output_formats``): ``dicom_seg`` also (or instead) writes ``output/<case>.dcm`` for a case
    that is a DICOM series. A case that cannot be read or used is logged and recorded, naming its file as the
    user gave it (a URL, a DICOM series), and the others are still predicted. A case whose outputs an earlier
    run of the same prediction finished is kept (see ``seglight.prediction.finished``), unless ``overwrite``; the
    NIfTI mask is written last, so a mask in place means its case is complete.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report = PredictionReport(output=output)
    store = store or RemoteCache()
    labels = predictor.models[0].task()["label_names"]
    fingerprint = prediction_fingerprint(predictor)
    for number, case in enumerate(cases, start=1):
        started = time.perf_counter()
        image = case.image
        target = output / f"{case.case_id}.nii.gz"
        seg = output / f"{case.case_id}.dcm"
        probability_file = output / "probabilities" / f"{case.case_id}.nii.gz"
        with_seg = DICOM_SEG in formats and case.series is not None
        try:
            image = _localize(case.image, store)
            case_mark = case_stamp(fingerprint, image)
            others = [probability_file] * save_probabilities + [seg] * with_seg
            # Only a stamped NIfTI mask tells a finished case (a DICOM SEG alone is written again).
            if (
                not overwrite
                and (NIFTI in formats or not with_seg)
                and is_finished(target, case_mark, others)
            ):
                report.kept[case.case_id] = target
                log.info("[%d/%d] %s: kept %s (finished earlier)", number, len(cases), case.case_id, target)
                continue
            result = predictor.predict_case(image, keep_probabilities=save_probabilities)
            if with_seg:
                write_dicom_seg(
                    result.mask, result.reference.affine, case.series, seg, labels, _model_name(predictor)
                )
                report.dicom_seg[case.case_id] = seg
        except Exception as exc:  # one bad scan (unreadable, too large for memory...) must not stop the rest
            user_error = find_user_error(exc)  # MONAI's Compose wraps the DataError our loader raises
            if isinstance(user_error, DiskFullError):
                raise user_error from None  # every further case would fail the same way
            if user_error is not None:
                why = _as_given(first_line(user_error), image, case)  # it names the file
                log.error("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            else:
                why = f"{case.first_file}: {type(exc).__name__}: {first_line(exc)}"
                log.exception("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            report.failed[case.case_id] = why
            continue
        written = [report.dicom_seg[case.case_id]] if case.case_id in report.dicom_seg else []
        probabilities = result.probability_image()
        if probabilities is not None:  # before the mask: a mask in place means its case is complete
            save_nifti(probabilities, probability_file)
        if NIFTI in formats or not written:  # a scan that is no DICOM series has its NIfTI mask at least
            written.insert(0, target)
            save_nifti(stamp(result.mask_image(), case_mark), target)
        report.written[case.case_id] = written[0]
        found = ", ".join(str(v) for v in np.unique(result.mask) if v != 0) or "none"
        log.info(
            "[%d/%d] %s: %s -> %s (labels: %s, %.1f s)",
            number,
            len(cases),
            case.case_id,
            "x".join(map(str, result.mask.shape)),
            ", ".join(map(str, written)),
            found,
            time.perf_counter() - started,
        )
    return report


def prediction_fingerprint(predictor: Predictor) -> str | None:
    """What ``predictor`` computes (its checkpoints and options), for telling a rerun's finished masks."""
    options = {
        "inference": predictor.inference,
        "tta": predictor.tta,
        "amp": predictor.amp,
        "largest_component": predictor.largest_component,
        "data": [model.data for model in predictor.models],
    }
    return model_fingerprint([model.name for model in predictor.models], options)


def _as_given(message: str, local: str | list[str], case: InputCase) -> str:
    """``message`` naming the case's files as the user gave them: the series, not its converted volume; the URL,
    not its downloaded copy."""
    copies = [local] if isinstance(local, str) else list(local)
    given = [case.image] if isinstance(case.image, str) else list(case.image)
    for copy, original in zip(copies, given, strict=False):
        message = message.replace(copy, case.source or original) if copy else message
    return message


def _model_name(predictor: Predictor) -> str:
    """What made the masks, as a DICOM SEG names it: the checkpoint's file name, or the ensemble's size."""
    models = predictor.models
    return Path(models[0].name).name if len(models) == 1 else f"ensemble of {len(models)} models"


def predict(
    ckpt: str | Path | Sequence[str | Path],
    input: str | Path,  # noqa: A002 - the command-line name
    output: str | Path,
    inference: Mapping[str, Any] | None = None,
    tta: bool = False,
    save_probabilities: bool = False,
    device: str = "auto",
    amp: bool = True,
    largest_component: Any = False,
    datalist_key: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    image_pattern: str | Sequence[str] | None = None,
    output_format: str | Sequence[str] = NIFTI,
    overwrite: bool = False,
) -> PredictionReport:
    """Segment every image of ``input`` with the model(s) of ``ckpt`` into ``output`` (see ``seglight.predict``).

    ``ckpt`` is a checkpoint file, a run folder, a folder of runs (the folds of a cross-validation) or a list of
    these; several models are an ensemble whose probabilities are averaged. ``output_format``: ``nifti``,
    ``dicom_seg`` (for DICOM series: a DICOM Segmentation of each) or a list of both. Masks that an earlier run
    of the same prediction finished in ``output`` are kept, unless ``overwrite``.
    """
    formats = output_formats(output_format)
    if DICOM_SEG in formats:
        require_highdicom()  # before any model is loaded
    predictor = Predictor(
        model_checkpoints(ckpt),
        inference=inference,
        tta=tta,
        device=device,
        amp=amp,
        largest_component=largest_component,
    )
    caches = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    store = RemoteCache(cache_dir=caches / "remote", endpoint_url=endpoint_url)
    settings = dict(predictor.models[0].data)
    if image_pattern is not None:  # subject folders laid out otherwise than the training data
        settings.update(layout="folder", image_pattern=image_pattern)
    listed = list_inputs(
        input, settings, datalist_key, store, channels=predictor.in_channels, dicom_cache_dir=caches / "dicom"
    )
    if DICOM_SEG in formats and not any(case.series is not None for case in listed):
        raise ConfigError(
            f"output_format=dicom_seg: input={input} holds no DICOM series, and a DICOM SEG is made of the series "
            "it segments; give a folder, s3:// prefix or .zip of DICOM files (or a datalist of series folders), "
            "or use output_format=nifti"
        )
    cases = [case for case in listed if case.problem is None]
    if any(
        is_remote(f) for case in cases for f in ([case.image] if isinstance(case.image, str) else case.image)
    ):
        hold(store.cache_dir)  # a cache prune meanwhile keeps the scans this prediction fetches
    _check_no_overwrite(cases, Path(output))
    log.info("Predicting %d image(s) with %s", len(cases), predictor.describe())
    report = predict_cases(predictor, cases, output, save_probabilities, store, formats, overwrite=overwrite)
    for case in listed:
        if case.problem is not None:  # a subject folder without a channel, say: named, the others written
            log.error("%s: FAILED: %s", case.case_id, case.problem)
            report.failed[case.case_id] = case.problem
    return report


def _check_no_overwrite(cases: Sequence[InputCase], output: Path) -> None:
    """ConfigError when a mask would replace one of the input images (output= the input folder, say)."""
    for case in cases:
        files = [case.image] if isinstance(case.image, str) else case.image
        target = (output / f"{case.case_id}.nii.gz").expanduser().resolve()
        if any(not is_remote(f) and Path(f).resolve() == target for f in files):
            raise ConfigError(
                f"output={output}: the mask {target.name} would overwrite the input image {target}"
            )
