"""The fault soak: SIGKILL a training run at random moments, many times, resume it each time, and count what was lost.

A longer tiny run reads its data from S3 through a fault-injecting proxy (random 503s, SlowDowns, resets and stalls
in front of a moto server on loopback), with the disk cache on and ``last.ckpt`` refreshed every few steps. Each
session is started as a user would (``python -m seglight.train ... resume=true``) and SIGKILLed at a random moment
after its job starts (set-up, cache fill, downloads, steps, validations, checkpoint writes). After every kill every
file a reader opens is checked (checkpoints with seglight's ``safe_load``, cache entries, JSON records), and the work
lost is measured: the last step the session finished against the step of the checkpoint the next session resumes
from. A run that reaches its end is checked whole (TensorBoard event files too) and a new one begins, until the
kills are done.

    python benchmarks/faults.py                 # 50 kills (tens of minutes on a laptop CPU)
    python benchmarks/faults.py --kills 8       # a quick look

Not part of CI: it prints one table (kills, resumes that finished, checkpoints found damaged, work lost per kill,
and the S3 proxy's requests failed and retried).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the fault proxy and the file checks are the test suite's own

from seglight.training.checkpoints import resume_candidates, safe_load  # noqa: E402
from tests.faults.integrity import damaged_files  # noqa: E402
from tests.faults.proxy import Fault, FaultProxy  # noqa: E402
from tests.helpers import free_port, make_msd_dataset, plug_callback  # noqa: E402

# Random faults on every read of the dataset's objects (GET) and of their metadata (HEAD).
SOAK_FAULTS = (
    Fault("503", path="/soak/", times=10**9, methods=("GET", "HEAD"), probability=0.05),
    Fault("slowdown", path="/soak/", times=10**9, methods=("GET", "HEAD"), probability=0.05),
    Fault("reset", path="/soak/", times=10**9, after_bytes=2000, probability=0.05),
    Fault("stall", path="/soak/", times=10**9, after_bytes=2000, stall_s=3.0, probability=0.03),
)


@dataclass
class Soak:
    """What the soak saw."""

    kills: int = 0
    resumes: int = 0  # sessions started with resume=true after a kill
    resumes_finished: int = 0  # ... that ran without an error (to their end, or to the next kill)
    runs_completed: int = 0
    damaged_checkpoints: list[str] = field(default_factory=list)
    damaged_other: list[str] = field(default_factory=list)
    lost_steps: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Run:
    """One run folder, started and resumed as a user would."""

    def __init__(self, folder: Path, url: str, endpoint: str, args: argparse.Namespace) -> None:
        self.dir = folder / "run"
        self.steps = folder / "steps.txt"
        self.cache = folder / "cache"
        self.overrides = [
            "data=msd",
            f"data.root={url}",
            "data.spatial_size=[16,16,16]",
            "data.num_workers=0",
            "data.batch_size=2",
            "data.cache=disk",
            f"data.remote.endpoint_url={endpoint}",
            "+data.remote.options.config_kwargs={read_timeout:1,connect_timeout:2}",
            "model.init_filters=8",
            f"trainer.max_epochs={args.epochs}",
            "trainer.enable_progress_bar=false",
            f"callbacks.preemption.every_n_train_steps={args.every_n}",
            plug_callback("steps", "RecordSteps", path=self.steps),
            f"hydra.run.dir={self.dir}",
        ]
        self.sessions = 0

    def start(self) -> tuple[subprocess.Popen, float]:
        resume = ["resume=true"] if self.sessions else []
        self.sessions += 1
        env = {**os.environ, "SEGLIGHT_CACHE_DIR": str(self.cache), "PYTHONWARNINGS": "ignore"}
        self.log = self.dir.parent / f"session-{self.sessions}.log"
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "seglight.train", *self.overrides, *resume],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return process, time.time()

    def recorded(self) -> list[int]:
        return [int(line) for line in self.steps.read_text().split()] if self.steps.exists() else []

    def newest_checkpoint_step(self) -> int:
        steps = []
        for path in resume_candidates(self.dir / "checkpoints", self.dir):
            try:
                steps.append(int(safe_load(path)["global_step"]))
            except Exception:
                continue
        return max(steps, default=0)


def job_started(run: Run, since: float, process: subprocess.Popen, timeout: float = 180.0) -> bool:
    """Wait until the session's Hydra job has started (it writes .hydra/config.yaml right before training)."""
    config = run.dir / ".hydra" / "config.yaml"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if config.exists() and config.stat().st_mtime >= since:
            return True
        time.sleep(0.01)
    return process.poll() is None


def soak(args: argparse.Namespace) -> tuple[Soak, dict[str, int]]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="seglight-faults-"))
    os.environ.update(AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak", AWS_DEFAULT_REGION="us-east-1")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(key, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="fault-soak")
    local = make_msd_dataset(work / "dataset", num_cases=args.cases, shape=(24, 24, 16))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(
            Bucket="fault-soak", Key=f"soak/{path.relative_to(local).as_posix()}", Body=path.read_bytes()
        )
    result = Soak()
    try:
        with FaultProxy(endpoint, seed=args.seed) as proxy:
            proxy.add(*SOAK_FAULTS)
            runs = 0
            run = Run(work / f"run-{runs}", "s3://fault-soak/soak", proxy.url, args)
            while result.kills < args.kills:
                before = len(run.recorded())
                resumed = run.sessions > 0
                process, since = run.start()
                if resumed:
                    result.resumes += 1
                if job_started(run, since, process):
                    time.sleep(rng.uniform(0.0, args.max_delay))
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                process.wait()
                if process.returncode not in (0, -signal.SIGKILL):
                    result.failures.append(f"{run.log}: exit status {process.returncode}")
                    break
                if resumed:
                    result.resumes_finished += 1
                if (
                    process.returncode == 0
                ):  # the run reached its end before the kill: check it whole, start anew
                    result.runs_completed += 1
                    result.damaged_other += damaged_files(run.dir, [run.cache / "preprocessed"])
                    runs += 1
                    run = Run(work / f"run-{runs}", "s3://fault-soak/soak", proxy.url, args)
                    continue
                result.kills += 1
                problems = damaged_files(run.dir, [run.cache / "preprocessed"], trackers=False)
                result.damaged_checkpoints += [p for p in problems if ".ckpt" in p]
                result.damaged_other += [p for p in problems if ".ckpt" not in p]
                reached = max(run.recorded()[before:], default=None)
                if reached is not None:
                    result.lost_steps.append(max(0, reached - run.newest_checkpoint_step()))
                print(
                    f"kill {result.kills}/{args.kills}: {run.dir.parent.name} session {run.sessions}, "
                    f"step reached {reached if reached is not None else '-'}, "
                    f"lost {result.lost_steps[-1] if reached is not None else 0}",
                    flush=True,
                )
            # The last run, resumed to its end.
            process, _ = run.start()
            result.resumes += 1
            process.wait()
            if process.returncode == 0:
                result.resumes_finished += 1
                result.runs_completed += 1
                result.damaged_other += damaged_files(run.dir, [run.cache / "preprocessed"])
            else:
                result.failures.append(f"{run.log}: exit status {process.returncode}")
            stats = proxy.stats()
    finally:
        server.stop()
    print(f"(work folder: {work})")
    return result, stats


def table(result: Soak, stats: dict[str, int], args: argparse.Namespace) -> str:
    lost = result.lost_steps or [0]
    rows = [
        ("kills (SIGKILL at random moments)", str(result.kills)),
        ("resumes that finished", f"{result.resumes_finished} of {result.resumes}"),
        ("runs completed", str(result.runs_completed)),
        ("checkpoints found damaged (must be 0)", str(len(result.damaged_checkpoints))),
        ("other files found damaged", str(len(result.damaged_other))),
        (
            f"work lost per kill, steps (every_n_train_steps={args.every_n})",
            f"median {statistics.median(lost):g}, max {max(lost)}",
        ),
        ("S3 proxy: requests", str(stats["requests"])),
        ("S3 proxy: requests failed (faults injected)", str(stats["failed"])),
        ("S3 proxy: requests retried after a fault", str(stats["retried"])),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["fault soak", f"{'measure':<{width}}  value"] + [
        f"{name:<{width}}  {value}" for name, value in rows
    ]
    lines += [f"  damaged: {p}" for p in result.damaged_checkpoints + result.damaged_other]
    lines += [f"  failed: {f}" for f in result.failures]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to deliver (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and the proxy's faults")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of each run (default 20)")
    parser.add_argument("--cases", type=int, default=8, help="cases of the dataset on S3 (default 8)")
    parser.add_argument("--every-n", type=int, default=2, help="callbacks.preemption.every_n_train_steps")
    parser.add_argument(
        "--max-delay", type=float, default=25.0, help="a kill comes 0..this many s into a session"
    )
    parser.add_argument("--workdir", help="where runs and caches go (default: a new temporary folder)")
    args = parser.parse_args()
    result, stats = soak(args)
    print(table(result, stats, args))
    clean = not result.damaged_checkpoints and not result.damaged_other and not result.failures
    return 0 if clean and result.resumes_finished == result.resumes else 1


if __name__ == "__main__":
    sys.exit(main())
