"""What a run prints: seglight's notices without the libraries' noise, a progress bar in a terminal, and one line
per epoch where the output goes to a log (CI, nohup, SLURM, SageMaker/CloudWatch).

Entry points call ``setup()`` first; seglight's Python API (``from seglight import compose, build``) calls
``setup_library()``, which gives a notebook or a script the same console without taking over logging that is
already configured. Known noise is dropped by exact message and issuing module only (a deprecation
that MONAI or Lightning raise inside their own code, an advertisement, a hint about a loader seglight chose on
purpose); every other warning still shows, once, as one log line that also lands in the run's log file.
``hydra.verbose=true`` (or ``SEGLIGHT_VERBOSE=1`` for any entry point) shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from seglight.core.io import is_disk_full

log = logging.getLogger("seglight")

VERBOSE_ENV = "SEGLIGHT_VERBOSE"
# A record carrying this attribute goes to the log file but not to the console (the progress bar shows it there).
FILE_ONLY = "seglight_file_only"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@dataclass(frozen=True)
class Noise:
    """A known message that says nothing to a seglight user: its text (a regex matched at its start), the module
    that issues it, and why it is dropped."""

    message: str
    module: str
    why: str


# Python warnings, matched as ``warnings.filterwarnings`` matches them (message start, issuing module).
WARNING_NOISE: tuple[Noise, ...] = (
    Noise(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning's own pytree helper builds torch's deprecated LeafSpec, twice per validation",
    ),
    Noise(
        r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy: Argument `always_return_as_numpy`",
        r"monai\.utils\.deprecate_utils",
        "MONAI's surface-distance code (HD95, NSD) passes the argument MONAI deprecated, once per case",
    ),
    Noise(
        r"The '\w+' does not have many workers",
        r"lightning\.pytorch\.trainer\.connectors\.data_connector",
        "seglight picks the loaders: a thread over cached cases, worker processes clamped to the CPUs",
    ),
    Noise(
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        r"lightning\.pytorch\.loops\.fit_loop",
        "seglight logs once per epoch, not every log_every_n_steps",
    ),
    Noise(
        r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully",
        r"monai\.data\.image_reader",
        "MONAI tries a GPU DICOM decoder wherever pydicom is installed (seglight[dicom]), for every image loader",
    ),
)
# Expected when a run continues in its own folder: the checkpoints there are the ones it continues from.
RESUME_NOISE = Noise(
    r"Checkpoint directory .* exists and is not empty",
    r"lightning\.pytorch\.callbacks\.model_checkpoint",
    "a resumed run writes into the checkpoint folder it resumes from",
)
# Log records (logger name prefix, message regex).
LOG_NOISE: tuple[tuple[str, str], ...] = (
    ("lightning", r"💡 Tip: For seamless cloud (logging|uploads)"),  # litlogger / litmodels advertisements
    (
        "lightning",
        r"GPU available: False, used: False$",
    ),  # seglight's own CPU notice says it, with what it does
    ("lightning", r"TPU available: False, using: 0 TPU cores$"),
    # A first run in an MLflow store creates its experiment, as it should; seglight names the store itself.
    ("lightning.pytorch.loggers.mlflow", r"Experiment with name .* not found\. Creating it\.$"),
    # The log line of the GPU DICOM decoder MONAI tries wherever pydicom is installed (see WARNING_NOISE).
    ("monai.data.nvimgcodec_pydicom_plugin", r"nvImageCodec is not available; skipping pydicom decoder"),
)
# Libraries that log their workings at INFO: shown from WARNING on (alembic: plugin set-up and every migration of
# a fresh MLflow sqlite store; MLflow: "Creating initial MLflow database tables"; highdicom: every module it copies
# into each DICOM SEG).
QUIET_LOGGERS = ("alembic", "mlflow.store", "mlflow.tracking._tracking_service", "highdicom")

_original_showwarning = warnings.showwarning
# The loggers Lightning gives a handler of their own when it is imported before logging is configured.
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_library_ready = False  # setup_library() has run in this process


def _quiet_startup_loggers(quiet: bool) -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


# Already on import: the entry points import this module before Hydra sets up logging, and what Hydra imports
# while it starts (its callbacks import MONAI, which imports Optuna, which imports alembic) logs at that point.
_quiet_startup_loggers(os.environ.get(VERBOSE_ENV, "").strip().lower() in ("", "0", "false", "no", "off"))


def wants_everything() -> bool:
    """Whether the user asked to see everything: ``hydra.verbose`` set, or ``SEGLIGHT_VERBOSE=1``."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.initialized() and bool(HydraConfig.get().verbose)
    except Exception:
        return False


def setup(verbose: bool | None = None) -> bool:
    """Prepare this process's console for a seglight entry point; returns whether everything is shown.

    Idempotent (a sweep calls it once per job, after Hydra has set up each job's log file). Outside a Hydra app
    (a script, ``python -m seglight.viz``) seglight's own lines are sent to stdout.
    """
    verbose = wants_everything() if verbose is None else bool(verbose)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    _route_lightning_to_root(root)
    # Warnings become one log line each (console and the run's log file), and each distinct one shows once.
    warnings.showwarning = _log_warning
    once = _add_filter_once(logging.getLogger("py.warnings"), _Once)
    once.seen.clear()  # each job of a sweep has its own log file, which shows its warnings again
    for handler in root.handlers:
        if not verbose:
            _add_filter_once(handler, _LibraryNoise)
        if not isinstance(handler, logging.FileHandler):
            _add_filter_once(handler, _ConsoleOnly)
    if not verbose:
        for noise in WARNING_NOISE:
            _ignore(noise)
    _quiet_startup_loggers(not verbose)
    if threading.excepthook is not _thread_exception:
        threading.excepthook = _thread_exception
    return verbose


def setup_library() -> None:
    """The commands' console for seglight's Python API (a notebook, a script), once per process.

    Where nobody has configured logging yet, this is ``setup()``. Where the root logger already has handlers (the
    user's own logging, a test runner's), nothing is replaced: the same noise filters are added to those handlers
    and to the ones Lightning adds for itself, unless ``SEGLIGHT_VERBOSE=1`` asks to see everything.
    """
    global _library_ready
    if _library_ready:
        return
    _library_ready = True
    root = logging.getLogger()
    if not root.handlers:
        setup()
        return
    if wants_everything():
        return
    lightning = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for handler in [*root.handlers, *(h for logger in lightning for h in logger.handlers)]:
        _add_filter_once(handler, _LibraryNoise)
    for noise in WARNING_NOISE:
        _ignore(noise)
    _quiet_startup_loggers(True)


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """Threads' uncaught exceptions as Python prints them, except a full disk in TensorBoard's writer thread: the
    run's main thread meets the same error at its next write and reports it in one line."""
    writer = type(args.thread).__name__ == "_AsyncWriterThread"
    if writer and args.exc_value is not None and is_disk_full(args.exc_value):
        return
    threading.__excepthook__(args)


def resuming() -> None:
    """Drop the warnings a run that continues in its own folder triggers by design (unless verbose)."""
    if not wants_everything():
        _ignore(RESUME_NOISE)


def _ignore(noise: Noise) -> None:
    warnings.filterwarnings("ignore", message=noise.message, category=Warning, module=noise.module)


def _route_lightning_to_root(root: logging.Logger) -> None:
    """Send Lightning's messages through the handlers the entry point set up (format, log file) instead of the
    stderr handlers Lightning adds for itself when it is imported before logging is configured."""
    if not root.handlers:
        return
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: Any = None,
) -> None:
    """``warnings.showwarning`` as one log line: category, message, where it was raised."""
    if file is not None:  # a caller asked for a particular stream
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    where = re.sub(r"^.*[/\\](site|dist)-packages[/\\]", "", filename)
    text = " ".join(str(message).split())
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, where, lineno)


class _Once(logging.Filter):
    """Each distinct warning once (per job of a sweep): libraries reset Python's own once-per-place memory whenever
    they use ``warnings.catch_warnings``, so the same warning would otherwise repeat every step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


class _LibraryNoise(logging.Filter):
    """Drops the known log records of ``LOG_NOISE``."""

    patterns = tuple((prefix, re.compile(message)) for prefix, message in LOG_NOISE)
    prefixes = tuple({prefix for prefix, _ in LOG_NOISE})

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        text = record.getMessage()
        return not any(record.name.startswith(p) and rx.match(text) for p, rx in self.patterns)


class _ConsoleOnly(logging.Filter):
    """On console handlers: drops records meant for the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False)


def _add_filter_once(target: logging.Filterer, kind: type[logging.Filter]) -> Any:
    """The ``kind`` filter of ``target``, added if it has none yet."""
    for existing in target.filters:
        if isinstance(existing, kind):
            return existing
    new = kind()
    target.addFilter(new)
    return new


# -- what the trainer shows ------------------------------------------------------------------------------------


def interactive() -> bool:
    """Whether a person watches the output live: stdout is a terminal, or this is a Jupyter kernel."""
    try:
        if sys.stdout is not None and sys.stdout.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    return in_jupyter_kernel()


def in_jupyter_kernel() -> bool:
    """Whether this process is a Jupyter kernel running a notebook (not merely one that imported ipykernel, as a
    notebook runner such as nbclient does)."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # an IPython too old or too odd to ask: assume no kernel
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
