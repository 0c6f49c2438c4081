"""The runs that check an exported model against the checkpoint's network before anything is written.

Both run on the same random volumes (values in [0, 1], seed 0): a batch of 2 at the trained size, then one volume
of another size the network takes (and, where that is refused, one volume at the trained size). TorchScript must
give identical logits, ONNX (through ONNX Runtime) logits within ``ONNX_TOLERANCE``; the runs that passed decide
which input sizes the JSON promises.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seglight.core.errors import SeglightError, first_line
from seglight.exporting.metadata import INPUT_NAME, ONNX_TOLERANCE, OUTPUT_NAME

log = logging.getLogger("seglight")

# Divisor tried for networks whose input-size rule seglight does not know, when checking other sizes.
UNKNOWN_DIVISOR = 16


@dataclass
class Check:
    """One comparison of the exported model with the checkpoint's network."""

    shape: list[int]
    passed: bool
    max_abs_difference: float | None = None
    error: str | None = None
    output_shape: list[int] | None = None


def example_input(channels: int, size: Sequence[int], batch: int) -> torch.Tensor:
    """Random values in [0, 1] (the windowed intensities), deterministic, shape ``(batch, channels, *size)``."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, channels, *[int(s) for s in size], generator=generator)


def torchscript_runner(model_bytes: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that runs the TorchScript model of ``model_bytes`` on the CPU without gradients."""
    module = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu").eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


def onnx_runner(model_bytes: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that runs the ONNX model of ``model_bytes`` in ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

    return run


def compare(
    network: nn.Module,
    run_exported: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    size: list[int],
    divisors: list[int] | None,
    exact: bool,
) -> dict[str, Check]:
    """Run the network and the exported model on the same volumes: a batch of 2 at the trained size, then one
    volume of another size the network takes (and, if that is refused, one volume at the trained size)."""
    step = divisors or [UNKNOWN_DIVISOR] * len(size)
    inputs = {
        "trained_size": (2, size),
        "other_size": (1, [s + d for s, d in zip(size, step, strict=True)]),
        "batch_of_one": (1, size),
    }
    checks: dict[str, Check] = {}
    for name, (batch, volume_size) in inputs.items():
        if name == "batch_of_one" and checks["other_size"].passed:
            break  # a batch of one at another size passed: batch and size are both free
        # TorchScript runs a profiled graph first and an optimised one from the next call on: check both.
        runs = 2 if exact and name == "trained_size" else 1
        x = example_input(channels, volume_size, batch=batch)
        checks[name] = _check(network, run_exported, x, exact, runs)
    return checks


def _check(
    network: nn.Module,
    run_exported: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    exact: bool,
    runs: int = 1,
) -> Check:
    """Compare the exported model's logits for ``x`` with the network's, ``runs`` times."""
    shape = list(x.shape)
    try:
        with torch.no_grad():
            expected = network(x)
    except Exception as exc:  # the network itself does not take this size
        return Check(shape, False, error=f"the checkpoint's network fails: {first_line(exc)}")
    passed, difference = True, 0.0
    for _ in range(runs):
        try:
            got = run_exported(x)
        except Exception as exc:  # the exported model does not take this shape
            return Check(shape, False, error=first_line(exc))
        if got.shape != expected.shape:
            return Check(shape, False, error=f"logits of shape {list(got.shape)}")
        difference = max(difference, float((got - expected).abs().max()) if got.numel() else 0.0)
        if exact:
            passed = passed and torch.equal(got, expected)
        else:
            passed = passed and bool(
                torch.isclose(got, expected, rtol=ONNX_TOLERANCE, atol=ONNX_TOLERANCE).all()
            )
    return Check(shape, passed, difference, output_shape=list(got.shape))


def accepted_shapes(
    checks: Mapping[str, Check], size: list[int], divisors: list[int] | None, fmt: str, ckpt: str | Path
) -> dict[str, Any]:
    """What the checks showed the exported model takes; SeglightError when it disagrees at the trained size."""
    trained, other, single = checks["trained_size"], checks["other_size"], checks.get("batch_of_one")
    if not trained.passed and not (single and single.passed):
        why = trained.error or (
            f"logits differ by up to {trained.max_abs_difference:.3g} "
            + (
                "(TorchScript must match exactly)"
                if fmt == "torchscript"
                else f"(more than {ONNX_TOLERANCE:g})"
            )
        )
        raise SeglightError(
            f"ckpt={ckpt}: the exported {fmt} model does not reproduce the checkpoint: {why}; nothing written"
        )
    if other.passed:
        batch: int | str = "any"
        spatial: dict[str, Any] = {"dynamic": True}
        if divisors is not None:
            spatial["multiple_of"] = list(divisors)
        else:
            spatial["note"] = "sizes this network takes; checked at the sizes listed under verification"
        return {"batch": batch, "spatial": spatial}
    log.info(
        "The exported model takes volumes of %s only (%s)", size, other.error or "its logits differ there"
    )
    batch = "any" if trained.passed and single is not None and single.passed else (2 if trained.passed else 1)
    return {"batch": batch, "spatial": {"dynamic": False, "size": list(size)}}
