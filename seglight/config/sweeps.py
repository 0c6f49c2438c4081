"""Sweeps that survive one bad trial: failures are recorded per job, and ``summary.csv`` ranks all runs.

``python -m seglight.train -m model=segresnet,unet optimizer.lr=1e-3,1e-4`` runs the four combinations, each in
its own folder under the sweep folder; at the end ``SweepSummary`` (a Hydra callback, see
``conf/hydra/default.yaml``) writes ``summary.csv`` there, prints it as a table, best first, and makes the sweep
exit with status 1 if any run failed. ``SweepSweeper`` and ``SweepLauncher`` (``conf/hydra/sweeper/grid.yaml``,
``conf/hydra/launcher/local.yaml``) run the jobs: a combination whose config cannot be composed is recorded as a
failed run, and a SIGTERM or Ctrl-C writes ``summary.csv`` for the runs so far before the sweep stops.
"""

from __future__ import annotations

import csv
import io
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.core.utils import run_job as hydra_run_job
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from seglight.core.errors import find_user_error
from seglight.core.internals import sweep_batches
from seglight.core.io import atomic_write_text
from seglight.training.summary import SUMMARY_FILE, RunSummary, read_summary

log = logging.getLogger("seglight")

COLUMNS = ("job", "status", "best_dice", "best_epoch", "wall_time_s", "overrides", "error", "output_dir")
EXIT_RUNS_FAILED = 1


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``, or a sweeper such as Optuna)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    """``task(cfg)``; in a multirun a failure is recorded in the job's ``summary.json`` and returned, not raised.

    Hydra aborts a whole sweep at the first job that raises; a failed trial should cost only itself. Outside a
    multirun errors propagate unchanged (one line and exit status 2 for user errors). Interrupts (SIGTERM,
    Ctrl-C) are not failures of the trial: they stop the sweep.
    """
    if not is_multirun():
        return task(cfg)
    started = time.monotonic()
    try:
        return task(cfg)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is not None:
            message = str(user_error)
        else:
            message = f"{type(exc).__name__}: {str(exc).strip()}"
            log.exception("Job failed with an unexpected error")  # the traceback goes to the job's log
        job = HydraConfig.get().job
        print(
            f"seglight.train: job {job.num} failed, the sweep goes on: {message}", file=sys.stderr, flush=True
        )
        output_dir = HydraConfig.get().runtime.output_dir
        return write_failure_summary(output_dir, message, time.monotonic() - started)


def write_sweep_summary(sweep_dir: Path, filename: str = "summary.csv") -> list[dict[str, Any]]:
    """Write ``summary.csv`` for the job folders under ``sweep_dir`` and print it as a table; returns the rows."""
    rows = collect_rows(sweep_dir)
    if rows:
        atomic_write_text(sweep_dir / filename, to_csv(rows))
        print(f"\nSweep summary ({sweep_dir / filename}):\n{format_table(rows)}", flush=True)
    return rows


class SweepSweeper(Sweeper):
    """Hydra's basic (grid) sweeper, without its check that every combination composes before any job runs.

    That check stops the whole sweep at one combination's config error; ``SweepLauncher`` records such a
    combination as a failed run instead, and runs the others. (Written against Hydra's public ``Sweeper``:
    Hydra's plugin scan re-executes its own plugin modules, which breaks subclasses of their classes.)
    """

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.hydra_context is not None and self.config is not None and self.launcher is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        batches = sweep_batches(overrides, self.max_batch_size)  # the grid, as Hydra makes it
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = []
        next_job = 0
        for batch in batches:
            returns.append(self.launcher.launch(batch, initial_job_idx=next_job))
            next_job += len(batch)
        return returns


class SweepLauncher(Launcher):
    """Hydra's basic launcher (jobs one after another, in this process) that survives its jobs' failures.

    Hydra composes each job's config in the launcher, before seglight runs: a combination that cannot be composed
    (a config option that does not exist, a wrong override) would abort the whole sweep there. Here it is recorded
    in its job folder as a failed run, and the sweep goes on. A SIGTERM or Ctrl-C, during a run or between runs,
    writes ``summary.csv`` for the runs so far (the interrupted one marked) before the sweep stops with 143/130.
    """

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally")
        runs: list[JobReturn] = []
        with _sigterm_stops_the_sweep():
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                job_dir = self._job_dir(idx)
                try:
                    sweep_config = self.hydra_context.config_loader.load_sweep_config(
                        self.config, list(overrides)
                    )
                except Exception as exc:
                    runs.append(record_compose_failure(job_dir, idx, overrides, exc))
                    continue
                with open_dict(sweep_config):
                    sweep_config.hydra.job.id = idx
                    sweep_config.hydra.job.num = idx
                started = time.monotonic()
                try:
                    runs.append(
                        hydra_run_job(
                            hydra_context=self.hydra_context,
                            task_function=self.task_function,
                            config=sweep_config,
                            job_dir_key="hydra.sweep.dir",
                            job_subdir_key="hydra.sweep.subdir",
                        )
                    )
                except (KeyboardInterrupt, SystemExit):
                    output_dir = Path(
                        str(OmegaConf.select(sweep_config, "hydra.runtime.output_dir") or job_dir)
                    )
                    if not (output_dir / SUMMARY_FILE).is_file() and output_dir.is_dir():
                        write_failure_summary(
                            output_dir,
                            "interrupted before training started",
                            time.monotonic() - started,
                            status="interrupted",
                        )
                    log.warning("Sweep interrupted during job %d: summary.csv lists the runs so far", idx)
                    write_sweep_summary(sweep_dir)
                    raise
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    def _job_dir(self, idx: int) -> Path:
        """The folder job ``idx`` gets (its ``hydra.sweep.subdir``), known without composing its config."""
        assert self.config is not None
        config = OmegaConf.create(OmegaConf.to_container(self.config.hydra.sweep, resolve=False))
        base = Path(str(self.config.hydra.sweep.dir))
        try:
            hydra_node = OmegaConf.create({"hydra": {"sweep": config, "job": {"num": idx, "id": idx}}})
            return base / str(OmegaConf.select(hydra_node, "hydra.sweep.subdir"))
        except Exception:  # a subdir that needs the job's own config: number the folder
            return base / str(idx)


def write_failure_summary(
    output_dir: str | Path, error: str, wall_time_s: float | None = None, status: str = "failed"
) -> dict[str, Any]:
    """Save a ``summary.json`` that records a failed (or interrupted) run and why, for the sweep's summary."""
    return RunSummary(
        status=status,
        error=error,
        wall_time_s=round(wall_time_s, 1) if wall_time_s is not None else None,
        output_dir=str(output_dir),
    ).write(output_dir)


def record_compose_failure(
    job_dir: Path, idx: int, overrides: Sequence[str], exc: BaseException
) -> JobReturn:
    """Record a job whose config could not be composed as a failed run (``summary.json``, its overrides)."""
    text = str(exc).split("Config search path:", 1)[
        0
    ]  # Hydra appends where it looked; the rest says what is wrong
    message = " ".join(text.split()) or type(exc).__name__
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(ListConfig(list(overrides))))
    write_failure_summary(job_dir, f"config: {message}", 0.0)
    print(
        f"seglight.train: job {idx} failed, the sweep goes on: config: {message}", file=sys.stderr, flush=True
    )
    result = JobReturn(overrides=list(overrides), working_dir=str(job_dir), status=JobStatus.COMPLETED)
    result.return_value = None  # as a run that failed (Optuna records the trial as failed)
    return result


@contextmanager
def _sigterm_stops_the_sweep() -> Iterator[None]:
    """Outside a run's own handling (which saves a checkpoint first), SIGTERM stops the sweep with 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` (its overrides and summary.json), best Dice first."""
    rows = []
    for overrides_file in sweep_dir.glob("**/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        if job_dir == sweep_dir:
            continue
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        summary = read_summary(job_dir)
        hydra_cfg = (
            OmegaConf.load(job_dir / ".hydra" / "hydra.yaml")
            if (job_dir / ".hydra/hydra.yaml").is_file()
            else {}
        )
        job_num = OmegaConf.select(hydra_cfg, "hydra.job.num", default=None) if hydra_cfg else None
        rows.append(
            {
                "job": job_num if job_num is not None else job_dir.name,
                "status": summary.status if summary else "no summary (killed?)",
                "best_dice": summary.best_dice if summary else None,
                "best_epoch": summary.best_epoch if summary else None,
                "wall_time_s": summary.wall_time_s if summary else None,
                "overrides": " ".join(overrides),
                "error": (summary.error if summary else None) or "",
                "output_dir": str(job_dir),
            }
        )
    return sorted(rows, key=_rank)


def _rank(row: dict[str, Any]) -> tuple:
    dice = row["best_dice"]
    completed = row["status"] == "completed"
    return (not completed, dice is None, -(dice or 0.0), str(row["job"]).zfill(6))


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text with a header."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows; overrides shared by every run are listed once, below it."""
    split = [row["overrides"].split() for row in rows]
    shared = set.intersection(*(set(s) for s in split)) if split else set()
    header = ("#", "status", "Dice/val", "epoch", "time", "overrides")
    lines = [header]
    for row, overrides in zip(rows, split, strict=True):
        dice = f"{row['best_dice']:.4f}" if row["best_dice"] is not None else "-"
        epoch = str(row["best_epoch"]) if row["best_epoch"] is not None else "-"
        wall = f"{row['wall_time_s']:.0f}s" if row["wall_time_s"] is not None else "-"
        varying = " ".join(o for o in overrides if o not in shared)
        if row["error"]:
            varying += f"  [{row['error'][:120]}]"
        lines.append((str(row["job"]), row["status"], dice, epoch, wall, varying))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )
    if shared:
        text += "\n(all runs: " + " ".join(o for o in split[0] if o in shared) + ")"
    return text
