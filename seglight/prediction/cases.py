"""Predicting a list of inputs into an output folder, one case at a time, and the report of what was written and
what failed: the work of ``python -m seglight.predict`` (and of ``seglight.evaluate``'s predictions)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from seglight.core.errors import ConfigError, DataError, find_user_error, first_line
from seglight.core.io import atomic_path
from seglight.data.remote import RemoteCache, default_cache_dir, is_remote
from seglight.prediction.inputs import InputCase, list_inputs
from seglight.prediction.predictor import Predictor
from seglight.training.checkpoints import model_checkpoints

log = logging.getLogger("seglight")


def _localize(image: str | list[str], store: RemoteCache) -> str | list[str]:
    """The case's files, with remote ones fetched into the cache."""
    if isinstance(image, list):
        return [str(_localize(p, store)) for p in image]
    return str(store.fetch(image)) if is_remote(image) else image


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write ``image`` atomically (``seglight.core.io.atomic_path``): no half-written mask is ever left."""
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


@dataclass
class PredictionReport:
    """What a prediction run wrote and what it could not do."""

    output: Path
    written: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # case -> what went wrong, naming the file

    def raise_for_failures(self) -> None:
        """A DataError naming every input that could not be predicted, if any."""
        if not self.failed:
            return
        total = len(self.failed) + len(self.written)
        lines = "\n  ".join(self.failed.values())
        raise DataError(f"{len(self.failed)} of {total} input(s) could not be predicted:\n  {lines}")


def predict_cases(
    predictor: Predictor,
    cases: Sequence[InputCase],
    output: str | Path,
    save_probabilities: bool = False,
    store: RemoteCache | None = None,
) -> PredictionReport:
    """Predict each case into ``output/<case>.nii.gz`` (and ``output/probabilities/``), one failure at a time.

    A case that cannot be read or used is logged and recorded, and the others are still predicted.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report = PredictionReport(output=output)
    store = store or RemoteCache()
    for number, case in enumerate(cases, start=1):
        started = time.perf_counter()
        try:
            image = _localize(case.image, store)
            result = predictor.predict_case(image, keep_probabilities=save_probabilities)
        except Exception as exc:  # one bad scan (unreadable, too large for memory...) must not stop the rest
            user_error = find_user_error(exc)  # MONAI's Compose wraps the DataError our loader raises
            if user_error is not None:
                why = first_line(user_error)  # it names the file
                log.error("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            else:
                why = f"{case.first_file}: {type(exc).__name__}: {first_line(exc)}"
                log.exception("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            report.failed[case.case_id] = why
            continue
        target = output / f"{case.case_id}.nii.gz"
        save_nifti(result.mask_image(), target)
        probabilities = result.probability_image()
        if probabilities is not None:
            save_nifti(probabilities, output / "probabilities" / f"{case.case_id}.nii.gz")
        report.written[case.case_id] = target
        found = ", ".join(str(v) for v in np.unique(result.mask) if v != 0) or "none"
        log.info(
            "[%d/%d] %s: %s -> %s (labels: %s, %.1f s)",
            number,
            len(cases),
            case.case_id,
            "x".join(map(str, result.mask.shape)),
            target,
            found,
            time.perf_counter() - started,
        )
    return report


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
) -> PredictionReport:
    """Segment every image of ``input`` with the model(s) of ``ckpt`` into ``output`` (see ``seglight.predict``).

    ``ckpt`` is a checkpoint file, a run folder, a folder of runs (the folds of a cross-validation) or a list of
    these; several models are an ensemble whose probabilities are averaged.
    """
    predictor = Predictor(
        model_checkpoints(ckpt),
        inference=inference,
        tta=tta,
        device=device,
        amp=amp,
        largest_component=largest_component,
    )
    store = RemoteCache(
        cache_dir=Path(cache_dir).expanduser() / "remote" if cache_dir else default_cache_dir() / "remote",
        endpoint_url=endpoint_url,
    )
    settings = dict(predictor.models[0].data)
    if image_pattern is not None:  # subject folders laid out otherwise than the training data
        settings.update(layout="folder", image_pattern=image_pattern)
    listed = list_inputs(input, settings, datalist_key, store, channels=predictor.in_channels)
    cases = [case for case in listed if case.problem is None]
    _check_no_overwrite(cases, Path(output))
    log.info("Predicting %d image(s) with %s", len(cases), predictor.describe())
    report = predict_cases(predictor, cases, output, save_probabilities, store)
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
