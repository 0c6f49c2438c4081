"""One training run on several processes: which process this is, what it tells its peers, and launches that
cannot work.

Lightning finds its peers itself under torchrun (TorchElastic), ``srun`` (SLURM) and its own launcher; submitit's
local executor gives no such environment, so ``adopt_submitit_tasks`` writes torch.distributed's. Only global
rank 0 writes the run folder's files and its log; the other ranks report warnings and errors on their console,
prefixed with their rank.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from seglight.core.errors import EXIT_USER_ERROR
from seglight.core.internals import attached_trainer, reruns_command_line
from seglight.training import run_folder

log = logging.getLogger("seglight")


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def env_rank() -> int:
    """This process's global rank as its launcher's environment gives it (0 alone or when unknown).

    torchrun and submitit (once adopted) set ``RANK``; SLURM ``SLURM_PROCID``; Lightning's own launcher starts
    the other processes of a node with ``LOCAL_RANK`` (and ``NODE_RANK`` on the other nodes).
    """
    for name in ("RANK", "SLURM_PROCID"):
        value = _int_env(name)
        if value is not None and (name != "SLURM_PROCID" or (_int_env("SLURM_NTASKS") or 1) > 1):
            return value
    local, node = _int_env("LOCAL_RANK") or 0, _int_env("NODE_RANK") or _int_env("GROUP_RANK") or 0
    return local + node  # not the global rank, but zero exactly for the global rank 0


def submitit_executor() -> str | None:
    """``local`` or ``slurm`` when this process is a submitit job (hydra/launcher=submitit_local or slurm)."""
    return os.environ.get("SUBMITIT_EXECUTOR") or None


def adopt_submitit_tasks() -> None:
    """Export torch.distributed's environment for the tasks of a submitit local job, so that Lightning sees ranks.

    Under SLURM, Lightning reads SLURM's own variables instead, so nothing is exported there.
    """
    if submitit_executor() != "local" or "RANK" in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks < 2:
        return
    # GPUs are left visible to every task: Lightning picks each process's device from its local rank.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ["NODE_RANK"] = str(env.node)


def requeued() -> bool:
    """Whether SLURM restarted this job after a requeue (preemption, time limit through submitit)."""
    return (_int_env("SLURM_RESTART_COUNT") or 0) > 0


def join_run() -> None:
    """Before anything is built: become a rank of the run (submitit's tasks) and leave the reporting to rank 0."""
    adopt_submitit_tasks()
    quiet_other_ranks(env_rank())


def leave_run() -> None:
    """Once a run is over: leave torch.distributed's process group, if this process joined one.

    PyTorch asks every program that initialised torch.distributed to destroy its group; left to the interpreter's
    shutdown, gloo's threads can abort the process (SIGABRT) after all the work is done, turning a finished run's
    exit status into a failure.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resume_requested(resume: bool, ckpt_path: str | None) -> bool:
    """``resume``, or true in a job that SLURM requeued: starting over in its run folder would lose its progress."""
    if resume or ckpt_path or not requeued():
        return bool(resume)
    log.info(
        "The job was requeued (SLURM_RESTART_COUNT): continuing from its last checkpoint, as resume=true."
    )
    return True


def cluster_plugins() -> list[Any]:
    """Trainer plugins for the cluster: under submitit on SLURM, Lightning's own SIGUSR1 auto-requeue is off.

    submitit requeues the job (on its USR2 signal before the time limit, and on preemption); SLURM then sends
    SIGTERM, on which seglight saves last.ckpt; the restarted job continues from it. One mechanism only.
    """
    if submitit_executor() == "slurm" and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def quiet_other_ranks(rank: int) -> None:
    """On ranks other than 0: no run-folder log file, and only warnings and errors, prefixed with the rank.

    Rank 0 reports for the run; the others would repeat every line of it into the same ``train.log``.
    """
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    seglight_log = logging.getLogger("seglight")
    seglight_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _RankPrefix) for f in seglight_log.filters):
        seglight_log.addFilter(_RankPrefix(rank))


def launch_problem(trainer: L.Trainer, multirun: bool) -> str | None:
    """Why this launch cannot give a correct run, or None: checked before any process trains."""
    if multirun and reruns_command_line(trainer):
        return (
            f"trainer.devices={trainer.num_devices} in a multirun (-m): Lightning would start each run's other "
            "processes by re-running this command line, sweep and all; use hydra/launcher=submitit_local (this "
            "machine) or hydra/launcher=slurm (pip install -e '.[slurm]'), or start each run with torchrun"
        )
    exported = _int_env("WORLD_SIZE")
    if submitit_executor() == "local" and exported is not None and exported != trainer.world_size:
        return (
            f"the submitit job has {exported} tasks but the trainer expects {trainer.world_size} processes; set "
            "hydra.launcher.tasks_per_node x hydra.launcher.nodes = trainer.devices x trainer.num_nodes"
        )
    if run_folder.UNSHARED_NAME_ON_NODES and trainer.world_size > 1:
        return (
            f"{run_folder.UNSHARED_NAME_ON_NODES[0]}: the nodes cannot agree on a run folder; give "
            "hydra.run.dir=<folder every node sees> (the same on every node), or torchrun --rdzv-id=<name>"
        )
    return None


def stop_unless_launchable(trainer: L.Trainer, multirun: bool, prog: str = "seglight.train") -> None:
    """One line on stderr and exit status 2 when ``launch_problem`` finds one; in a sweep, this stops the sweep.

    A SystemExit rather than a ConfigError: every run of the sweep would fail the same way, so the sweep stops
    at once instead of recording each run as failed.
    """
    problem = launch_problem(trainer, multirun)
    if problem is None:
        return
    print(f"{prog}: error: {problem}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def gather_rows(
    module: L.LightningModule, parts: list[torch.Tensor] | None, width: int
) -> torch.Tensor | None:
    """Per-case rows ``(cases, width)`` of every process, concatenated in rank order; None if there are none.

    Each process scores one contiguous block of the validation cases, so rank order is the cases' order.
    Processes may hold different numbers of rows (none at all, too): they pad to the longest with NaN for the
    collective, and the padding is cut off after.
    """
    device = module.device
    rows = torch.cat([p.reshape(-1, width).to(device) for p in parts]) if parts else None
    if rows is None:
        rows = torch.empty(0, width, device=device)
    if attached_trainer(module) is None or module.trainer.world_size <= 1:
        return rows if rows.numel() else None
    rows = rows.to(device)
    counts = module.all_gather(torch.tensor(rows.shape[0], device=device)).reshape(-1).tolist()
    padded = torch.full((max(max(counts), 1), width), float("nan"), device=device)
    padded[: rows.shape[0]] = rows
    gathered = module.all_gather(padded).reshape(len(counts), -1, width)
    merged = torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])
    return merged if merged.numel() else None
