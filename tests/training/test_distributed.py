"""Data-parallel training through real torch.distributed (gloo, CPU processes): Lightning's launcher, torchrun on
one and on two "nodes", submitit's local executor; validation scored once per case; launches that cannot work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_SHAPE, TINY_SIZE, free_port, run_cli

pytestmark = pytest.mark.slow

# 11 cases: 3 validate (an odd number: one process scores 2, the other 1), 8 train: 4 steps of 2 an epoch on one
# process, 2 on each of two.
NUM_CASES, VAL_FRACTION, BATCH = 11, 0.25, 2
RECORD = "tests.callbacks.RecordSamples"


def overrides(run_dir: Path | None, *extra: str) -> list[str]:
    """A tiny DDP run on the demo data (without ``hydra.run.dir`` when ``run_dir`` is None)."""
    base = [
        "trainer=ddp",
        f"data.demo.num_cases={NUM_CASES}",
        f"data.demo.shape=[{','.join(map(str, TINY_SHAPE))}]",
        f"data.spatial_size=[{','.join(map(str, TINY_SIZE))}]",
        f"data.val_fraction={VAL_FRACTION}",
        f"data.batch_size={BATCH}",
        "data.num_workers=0",
        "model.init_filters=8",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.validation_picture",
        "~callbacks.progress_plot",
    ]
    return [*base, *extra] + ([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])


def environment(cache: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    return {**env, "SEGLIGHT_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}


def torchrun(args: list[str], cache: Path, root: Path | None = None) -> subprocess.Popen:
    """``torchrun args`` in the background; ``root`` is where default run folders go (``SEGLIGHT_ROOT``)."""
    env = environment(cache) | ({"SEGLIGHT_ROOT": str(root)} if root is not None else {})
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def record(run_dir: Path, stage: str = "fit") -> dict[int, dict]:
    """What ``RecordSamples`` wrote for each rank."""
    records = [json.loads(p.read_text()) for p in run_dir.glob(f"samples/samples-rank*-{stage}.json")]
    return {r["rank"]: r for r in records}


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """Two epochs on two CPU processes started by Lightning's own launcher, as ``python -m seglight.train``."""
    run_dir = tmp_path_factory.mktemp("ddp") / "whole"
    samples = f"+callbacks.record={{_target_:{RECORD},dirpath:{run_dir / 'samples'}}}"
    result = run_cli(
        "seglight.train",
        *overrides(run_dir, "trainer.devices=2", "trainer.max_epochs=2", samples),
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_each_process_trains_on_its_own_share(whole: Path) -> None:
    split = json.loads((whole / "split.json").read_text())
    assert (len(split["train"]), len(split["val"])) == (8, 3)
    saved = last(whole)
    steps_alone = len(split["train"]) // BATCH  # one process: 4 steps an epoch
    assert saved["global_step"] == 2 * steps_alone // 2 and saved["epoch"] == 1
    ranks = record(whole)
    assert sorted(ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks.values())
    seen = [{case for _, _, case, _ in ranks[r]["train"]} for r in (0, 1)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(split["train"])  # disjoint shares, all cases
    for r in (0, 1):  # each epoch, each process sees each of its cases once
        per_epoch = [sorted(c for e, _, c, _ in ranks[r]["train"] if e == epoch) for epoch in (0, 1)]
        assert per_epoch[0] == per_epoch[1] == sorted(seen[r])


def test_the_two_processes_draw_different_flips(whole: Path) -> None:
    ranks = record(whole)
    flips = [[flipped for *_, flipped in ranks[r]["train"]] for r in (0, 1)]
    assert None not in flips[0] + flips[1], "every training volume is the cached one, flipped or not"
    assert flips[0] != flips[1]
    assert {True, False} <= set(flips[0] + flips[1])


def test_one_run_folder_written_by_rank_zero(whole: Path) -> None:
    assert [p.name for p in whole.parent.iterdir()] == ["whole"]
    assert sorted(p.name for p in (whole / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert len(list((whole / "checkpoints").iterdir())) == 2  # best and last, once
    log = (whole / "train.log").read_text()
    assert log.count("Model: SegResNet") == 1 and "[rank 1]" not in log
    sessions = json.loads((whole / "run_info.json").read_text())["sessions"]
    assert len(sessions) == 1
    assert json.loads((whole / "summary.json").read_text())["status"] == "completed"


def test_validation_scores_each_case_once_and_matches_one_process(
    whole: Path, tmp_path: Path, cache_dir: Path
) -> None:
    from seglight import build, compose

    ckpt = str(whole / "checkpoints" / "last.ckpt")
    samples = f"+callbacks.record={{_target_:{RECORD},dirpath:{tmp_path / 'samples'}}}"
    common = [o for o in overrides(None) if o != "trainer=ddp"] + ["logger=none"]
    process = torchrun(
        [
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tests.training.ddp_validate",
            ckpt,
            str(tmp_path),
            *common,
            "trainer=ddp",
            "trainer.devices=2",
            samples,
        ],
        cache_dir,
    )
    finish(process)
    two = json.loads((tmp_path / "metrics.json").read_text())
    split = json.loads((whole / "split.json").read_text())
    scored = [case for r in record(tmp_path, "validate").values() for _, case in r["val"] if case]
    assert sorted(scored) == sorted(split["val"])  # each validation case once, none twice

    cfg = compose([*common, "trainer=cpu"], output_dir=tmp_path / "one")
    datamodule, module, trainer = build(cfg)
    trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    one = {name: float(value) for name, value in trainer.callback_metrics.items()}
    assert {"Dice/val", "HD95/val", "Loss/val"} <= one.keys() == two.keys()
    for name in one:
        assert two[name] == pytest.approx(one[name], abs=1e-6), name


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """``torchrun --nproc_per_node 2`` (run folder named by seglight), stopped by SIGTERM to every process after
    the first of 2 epochs; then two "nodes" (``torchrun --nnodes 2`` on loopback, one process each) continue in
    that folder with resume=true."""
    root = tmp_path_factory.mktemp("torchrun")
    sigterm = "+callbacks.sigterm={_target_:tests.callbacks.SignalAtStep,step:2}"
    first = torchrun(
        [
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "seglight.train",
            *overrides(None, "trainer.devices=2", "trainer.max_epochs=2", sigterm),
        ],
        cache_dir,
        root=root,
    )
    output, _ = first.communicate(timeout=300)
    assert first.returncode != 0 and "Interrupted by SIGTERM" in output, output[-4000:]
    runs = list((root / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # both processes chose the same run folder
    run_dir = runs[0]
    assert last(run_dir)["global_step"] == 2  # the first epoch, all of it
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    port = free_port()
    nodes = [
        torchrun(
            [
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "seglight.train",
                *overrides(
                    run_dir, "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=2", "resume=true"
                ),
            ],
            cache_dir,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        finish(node)
    return run_dir


def test_resume_under_torchrun_ends_as_an_uninterrupted_run(resumed: Path, whole: Path) -> None:
    assert len(list(resumed.parent.iterdir())) == 1  # both launches, all processes: one run folder
    done, reference = last(resumed), last(whole)
    assert (done["epoch"], done["global_step"]) == (reference["epoch"], reference["global_step"])
    sessions = json.loads((resumed / "run_info.json").read_text())["sessions"]
    assert [s["resumed_from"] is not None for s in sessions] == [False, True]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == reference["global_step"]


def test_submitit_local_runs_a_two_task_ddp_job(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "seglight.train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        *overrides(None, "trainer.devices=2", "trainer.max_epochs=1"),
        cache=cache_dir,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert (
        summary["status"] == "completed" and summary["global_step"] == 2
    )  # 2 steps: half of one process's 4
    assert (sweep / "summary.csv").is_file()


def test_multirun_with_lightnings_own_launcher_stops_with_one_line(tmp_path: Path, cache_dir: Path) -> None:
    result = run_cli(
        "seglight.train",
        "-m",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "seed=1,2",
        *overrides(None, "trainer.devices=2", "trainer.max_epochs=1"),
        cache=cache_dir,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("seglight.train: error:")]
    assert len(lines) == 1 and "hydra/launcher=submitit_local" in lines[0] and "torchrun" in lines[0]
    assert not list((tmp_path / "sweep").glob("1/*")), "the sweep stopped at its first run"
