"""What a candidate (input size, batch) costs in memory: measured on a CUDA GPU, estimated elsewhere.

Measured (``Meter``): a few real training steps of the configured module (network, loss, optimiser) at the
trainer's precision and a sliding-window validation of the largest volume; the peak is
``torch.cuda.max_memory_allocated``. Results are kept per (GPU, configuration, size, batch, precision) in a JSON
file under seglight's cache folder.

Estimated (``Estimator``, no CUDA here): one real forward/backward on the CPU at a small input of the same
network, counting the bytes of the tensors autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``), scaled linearly to the candidate's voxels and batch and to the
precision, plus parameters, gradients and optimiser state, times ``ESTIMATE_CALIBRATION``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from seglight.core.io import atomic_write_text
from seglight.models.networks import class_name, size_divisors
from seglight.planning.steps import (
    Precision,
    first_optimizer,
    input_channels,
    quiet_steps,
    train_steps,
    training_batch,
    validate,
    validation_batch,
)

log = logging.getLogger("seglight")

GIB = 2**30
# The share of the budget kept free: the CUDA context (~0.5 GiB, not counted by the allocator), the caching
# allocator's fragmentation, and cuDNN workspaces that vary with the algorithm chosen at run time.
DEFAULT_MARGIN = 0.15
# Peak CUDA memory over the estimate: not yet measured on a GPU, so a conservative guess. To calibrate, run
# `python benchmarks/plan_memory.py` on a CUDA GPU: it prints measured/estimated for a grid of networks, sizes,
# batches and precisions; set this to the largest ratio it reports (rounded up to 0.05).
ESTIMATE_CALIBRATION = 1.25
# Without CUDA and without plan.gpu_memory_gb, training runs on the CPU: plan for this share of the free RAM.
CPU_MEMORY_SHARE = 0.5
MEASURE_STEPS = 3

# (mode, input size, target spacing) -> a fresh module for that input, on the CPU, as training would build it
# (the scheduler may be left out: it does not change memory)
ModuleFactory = Callable[[str, Sequence[int], Sequence[float]], Any]


@dataclass(frozen=True)
class Budget:
    """The memory a plan may use: ``usable`` = total x (1 - margin) - reserved."""

    total_bytes: float
    source: str  # where the total comes from, for the printout
    margin: float = DEFAULT_MARGIN
    reserved_bytes: float = 0.0  # e.g. the training cases cached on the GPU (data.cache=auto/gpu)
    reserved_for: str = ""

    @property
    def usable_bytes(self) -> float:
        """What a training step and a validation may peak at."""
        return self.total_bytes * (1.0 - self.margin) - self.reserved_bytes

    def describe(self) -> str:
        """``24.0 GiB (plan.gpu_memory_gb=24) - 15 % margin - 1.2 GiB training cache = 19.2 GiB``."""
        text = f"{gib(self.total_bytes)} ({self.source}) - {self.margin:.0%} margin"
        if self.reserved_bytes:
            text += f" - {gib(self.reserved_bytes)} {self.reserved_for}"
        return f"{text} = {gib(self.usable_bytes)} usable"


@dataclass(frozen=True)
class Use:
    """What one candidate needs: the peaks of training and of validation, and how they were found."""

    train_bytes: float
    validation_bytes: float
    method: str  # "measured" or "estimated"

    @property
    def peak_bytes(self) -> float:
        """The larger of the two peaks."""
        return max(self.train_bytes, self.validation_bytes)


def gib(num_bytes: float) -> str:
    """``12.30 GiB`` (``51.2 MiB`` below a tenth of a GiB)."""
    if math.isinf(num_bytes):
        return "out of memory"
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"


def free_ram_bytes() -> float:
    """Memory the OS reports available (Linux: MemAvailable), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# -- the estimate ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Per-voxel costs of one network, from a real forward/backward at ``reference`` voxels (batch 1)."""

    reference: list[int]
    saved_bytes_per_voxel: float  # tensors saved for backward, per input voxel of one sample
    largest_output_per_voxel: float  # the largest module output in inference, per input voxel
    parameter_bytes: float
    optimizer_bytes: float  # optimiser state after one step
    in_channels: int
    out_channels: int


class Estimator:
    """Estimated memory of candidates for a budget on a GPU this machine does not have (or on the CPU).

    Args:
        factory: builds the configured module for an input size.
        mode: ``resize`` (whole volumes are the input, batch 1 in validation) or ``patch`` (sliding windows).
        precision: the trainer's precision on the device that will train.
        validation_shape: the largest volume validation segments (patch mode); spacing: the target spacing (mm).
        calibration: peak over estimate (``ESTIMATE_CALIBRATION``).
        profiles: measured per-voxel costs by network configuration, shared between estimators.
    """

    method = "estimated"

    def __init__(
        self,
        factory: ModuleFactory,
        mode: str,
        precision: Precision,
        validation_shape: Sequence[int] | None,
        spacing: Sequence[float],
        calibration: float = ESTIMATE_CALIBRATION,
        profiles: dict[str, Profile] | None = None,
    ) -> None:
        self.factory = factory
        self.spacing = [float(s) for s in spacing]
        self.mode = mode
        self.precision = precision
        self.validation_shape = list(validation_shape) if validation_shape is not None else None
        self.calibration = float(calibration)
        self.profiles = profiles if profiles is not None else {}
        self.sw_batch_size = 1

    def __call__(self, size: Sequence[int], batch: int) -> Use:
        module = self.factory(self.mode, list(size), self.spacing)
        profile = self.profile(module, size)
        self.sw_batch_size = int(module.hparams.inference.get("sw_batch_size") or 1)
        return self.estimate(profile, size, batch)

    def profile(self, module: Any, size: Sequence[int]) -> Profile:
        """The module's per-voxel costs, measured once per network configuration."""
        key = json.dumps(module.hparams.net, sort_keys=True, default=str)
        reference = reference_size(module.hparams.net, size)
        key += json.dumps(reference)
        if key not in self.profiles:
            self.profiles[key] = measure_profile(module, reference)
        return self.profiles[key]

    def estimate(self, profile: Profile, size: Sequence[int], batch: int) -> Use:
        """Training and validation peaks of ``batch`` inputs of ``size`` voxels."""
        voxels = math.prod(int(s) for s in size)
        factor = self.precision.activation_bytes
        static = 2 * profile.parameter_bytes + profile.optimizer_bytes  # weights, gradients, optimiser state
        if self.precision.autocast is not None:
            static += profile.parameter_bytes / 2  # autocast's 16-bit copies of the weights
        activations = profile.saved_bytes_per_voxel * voxels * batch * factor
        inputs = batch * voxels * (profile.in_channels * 4 + 4)  # images and float labels
        train = (static + activations + inputs) * self.calibration
        if self.mode == "patch" and self.validation_shape is not None:
            volume, windows = math.prod(self.validation_shape), self.sw_batch_size
            # The image, the stitched output and MONAI's count map stay whole; windows run a batch at a time.
            buffers = volume * 4 * (profile.in_channels + profile.out_channels + 1)
        else:
            volume, windows, buffers = voxels, 1, voxels * 4 * (profile.in_channels + profile.out_channels)
        # A layer's input, output and a residual branch are alive together during inference.
        window = 3 * profile.largest_output_per_voxel * voxels * windows * factor
        validation = (static + window + buffers) * self.calibration
        return Use(train, validation, self.method)


def reference_size(net: dict[str, Any], size: Sequence[int]) -> list[int]:
    """A small input with the network's layout (twice its size divisors, so the deepest level has 2 voxels a
    side): activations of convolutional networks scale exactly with the voxels from there. UNETR's input size is
    fixed (and its attention is quadratic in it): it is measured at the candidate itself."""
    divisors = size_divisors(net, len(size))
    if divisors is None or class_name(net) == "UNETR":
        return [int(s) for s in size]
    return [min(int(s), 2 * int(d)) for s, d in zip(size, divisors, strict=True)]


def measure_profile(module: Any, reference: Sequence[int]) -> Profile:
    """One real forward/backward and optimiser step on the CPU at batch 1, counting what autograd saves."""
    module = module.cpu().float()
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:  # weights are counted once, as parameters
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    optimizer = first_optimizer(module)
    batch = training_batch(module, 1, reference, torch.device("cpu"))
    module.train()
    with quiet_steps(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    largest = [0]

    def record(_module: Any, _inputs: Any, output: Any) -> None:
        if torch.is_tensor(output):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in module.net.modules()]
    module.eval()
    try:
        with torch.no_grad():
            logits = module(batch["image"])
    finally:
        for hook in hooks:
            hook.remove()
    voxels = math.prod(int(s) for s in reference)
    return Profile(
        reference=[int(s) for s in reference],
        saved_bytes_per_voxel=sum(saved.values()) / voxels,
        largest_output_per_voxel=largest[0] / voxels,
        parameter_bytes=float(sum(p.numel() * p.element_size() for p in module.parameters())),
        optimizer_bytes=float(optimizer_bytes),
        in_channels=input_channels(module),
        out_channels=int(logits.shape[1]),
    )


# -- the measurement -----------------------------------------------------------------------------------------------


class Meter:
    """Measured memory of candidates on this process's CUDA GPU, cached across runs.

    Args:
        factory: builds the configured module for an input size.
        mode: ``resize`` or ``patch``.
        precision: the trainer's precision.
        validation_shape: the largest volume validation segments (patch mode); spacing: its voxel size (mm).
        cache_file: the JSON file of earlier measurements.
        device: the CUDA device.
        steps: training steps per measurement (the optimiser's state appears after the first).
    """

    method = "measured"

    def __init__(
        self,
        factory: ModuleFactory,
        mode: str,
        precision: Precision,
        validation_shape: Sequence[int] | None,
        spacing: Sequence[float],
        cache_file: Path,
        device: torch.device | None = None,
        steps: int = MEASURE_STEPS,
    ) -> None:
        self.factory = factory
        self.mode = mode
        self.precision = precision
        self.validation_shape = list(validation_shape) if validation_shape is not None else None
        self.spacing = [float(s) for s in spacing]
        self.cache = MeasurementCache(cache_file)
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.steps = int(steps)
        self.gpu = torch.cuda.get_device_name(self.device)

    def __call__(self, size: Sequence[int], batch: int) -> Use:
        module = self.factory(self.mode, list(size), self.spacing)
        volume = self.validation_shape if self.mode == "patch" and self.validation_shape else list(size)
        key = measurement_key(self.gpu, module, size, batch, self.precision.name, volume, self.steps)
        cached = self.cache.get(key)
        if cached is not None:
            return Use(cached["train_bytes"], cached["validation_bytes"], self.method)
        use = self.measure(module, size, batch, volume)
        self.cache.put(key, {**asdict(use), "gpu": self.gpu, "size": list(size), "batch": batch})
        return use

    def measure(self, module: Any, size: Sequence[int], batch: int, volume: Sequence[int]) -> Use:
        """Peak allocated memory of the training steps, then of one validation (gradients still alive)."""
        device = self.device
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        module = module.to(device=device, dtype=self.precision.parameters)
        optimizer = None
        try:
            optimizer = first_optimizer(module)
            scaler = torch.amp.GradScaler("cuda") if self.precision.scaler else None
            train_steps(
                module,
                optimizer,
                training_batch(module, batch, size, device),
                self.precision,
                self.steps,
                scaler,
            )
            torch.cuda.synchronize(device)
            train = torch.cuda.max_memory_allocated(device) - base
            torch.cuda.reset_peak_memory_stats(device)
            validate(module, validation_batch(module, volume, self.spacing, device), self.precision)
            validation = torch.cuda.max_memory_allocated(device) - base
        except torch.cuda.OutOfMemoryError:
            train = validation = math.inf
        finally:
            release(module, optimizer)
        return Use(float(train), float(validation), self.method)


def release(module: Any, optimizer: Any = None) -> None:
    """Give a measured module's GPU memory back (weights, gradients, optimiser state, the caching allocator's
    blocks), so the next candidate, or the training after planning, starts from an empty GPU."""
    if optimizer is not None:
        optimizer.state.clear()
    module.cpu()
    if getattr(module, "surface", None) is not None:
        module.surface.close()  # the HD95 thread of its validation
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measurement_key(
    gpu: str, module: Any, size: Sequence[int], batch: int, precision: str, volume: Sequence[int], steps: int
) -> str:
    """What a measurement depends on: the GPU, the module's configuration, the input, the precision."""
    hparams = module.hparams
    config = {
        "gpu": gpu,
        "torch": torch.__version__,
        "net": hparams.net,
        "loss": hparams.loss,
        "optimizer": hparams.optimizer,
        "compute": hparams.compute,
        "inference": hparams.inference,
        "size": [int(s) for s in size],
        "batch": int(batch),
        "precision": precision,
        "volume": [int(s) for s in volume],
        "steps": steps,
    }
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class MeasurementCache:
    """Measurements in one JSON file, written atomically under a lock (several plans may run at once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry for ``key``, or None."""
        return self._read().get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Add (or replace) one entry, keeping every other process's entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path.with_name(f".{self.path.name}.lock"))):
            entries = self._read()
            entries[key] = {**entry, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic_write_text(self.path, json.dumps(entries, indent=1))

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
