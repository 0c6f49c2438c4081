"""The name of a new run folder, the same in every process of a run (``${seglight.run_name:}`` in the configs).

Several processes of one run each start Hydra, and each resolves ``hydra.run.dir``; a name made from the clock
would differ between processes that start a second apart. The name is therefore taken from what the
processes share:

- SLURM with several tasks (``srun``): ``slurm-<job id>`` (``<array job>_<task>`` for an array), the same on every
  node and again after the job is requeued, so ``resume=true`` finds its checkpoint.
- torchrun on one node: the time torchrun was started (its agent is the parent of every worker).
- torchrun on several nodes: ``torchrun-<rendezvous id>`` (``torchrun --rdzv-id``); without one, there is
  nothing the nodes share and ``seglight.training.distributed.launch_problem`` asks for ``hydra.run.dir``.
- anything else: now. (Lightning's own launcher hands its run folder to the processes it starts.)
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "seglight.run_name"
TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
# Set when this process had to name its run folder from its own clock although it is one of several nodes.
UNSHARED_NAME_ON_NODES: list[str] = []


def _int_env(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def slurm_job_name() -> str | None:
    """``<job id>`` (``<array job id>_<task id>`` in an array) when several SLURM tasks run this command."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or _int_env("SLURM_NTASKS", 1) < 2:
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else job


def process_start_time(pid: int) -> datetime | None:
    """When process ``pid`` started (Linux: from /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat, counted after the command name
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


def run_name() -> str:
    """The run folder's name (see the module's docstring for where it comes from)."""
    slurm = slurm_job_name()
    if slurm is not None:
        return f"slurm-{slurm}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if _int_env("GROUP_WORLD_SIZE", 1) > 1:
            if run_id and run_id != "none":
                return f"torchrun-{run_id}"
            UNSHARED_NAME_ON_NODES.append("torchrun --nnodes > 1 without --rdzv-id")
        else:
            started = process_start_time(os.getppid())
            if started is not None:
                return started.strftime(TIME_FORMAT)
    return datetime.now().strftime(TIME_FORMAT)


def register_resolvers() -> None:
    """Make ``${seglight.run_name:}`` available to Hydra configs (cached: one name per process)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, run_name, use_cache=True)
