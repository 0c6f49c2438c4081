"""Shared caches under load: two training runs, a prediction and a loop of ``python -m seglight.cache prune`` fill
and prune the same disk cache (data.cache=disk) and S3 file cache at once. Every run reads exactly its own data
(content hashes of what it reads from the caches against its own files), none crashes, and the caches end within
their limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seglight.data.caching.files import GB, cache_entries
from seglight.prediction.cases import predict
from tests.helpers import REPO, S3, make_msd_dataset, plug_callback, write_nifti

pytestmark = pytest.mark.slow

LIMIT_GB = 0.0002  # 200 kB: less than what the runs bring, so every prune has work


def start(args: list[str], log: Path, cache: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "SEGLIGHT_CACHE_DIR": str(cache),
        "PYTHONWARNINGS": "ignore",
        "HYDRA_FULL_ERROR": "0",
    }
    with open(log, "w") as handle:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def old_entries(cache: Path) -> None:
    """Entries another run left a week ago, for the pruner to remove while the runs fill the caches."""
    then = time.time() - 7 * 24 * 3600
    for index in range(6):
        entry = cache / "preprocessed" / f"{index:064x}.pt"
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(os.urandom(30_000))
        obj = (
            cache
            / "remote"
            / "s3"
            / "shared-caches"
            / "old"
            / f"scan{index}.nii.gz@0"
            / f"scan{index}.nii.gz"
        )
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(os.urandom(30_000))
        for path in (entry, obj):
            os.utime(path, (then, then))


def test_runs_predictions_and_prunes_share_the_caches(s3: S3, trained_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    old_entries(cache)
    datasets = {
        name: s3.upload(make_msd_dataset(tmp_path / name, num_cases=4, shape=shape), "shared-caches", name)
        for name, shape in (("a", (20, 20, 12)), ("b", (22, 20, 12)))
    }
    rng = np.random.default_rng(3)
    for name in ("p", "q"):
        write_nifti(
            tmp_path / "scans" / f"{name}.nii.gz", rng.normal(0, 100, (24, 24, 16)).astype(np.float32)
        )
    scans = s3.upload(tmp_path / "scans", "shared-caches", "scans")

    processes = {}
    for name, url in datasets.items():
        check = plug_callback("check", "CheckCachedData", path=tmp_path / f"check-{name}.json")
        overrides = ["data=msd", f"data.root={url}", "data.spatial_size=[16,16,8]", "data.num_workers=0"]
        overrides += ["data.cache=disk", f"data.cache_max_gb={LIMIT_GB}", "model.init_filters=8"]
        overrides += [
            "trainer.max_epochs=1",
            "logger=none",
            f"hydra.run.dir={tmp_path / ('run-' + name)}",
            check,
        ]
        command = [sys.executable, "-m", "seglight.train", *overrides]
        processes[name] = start(command, tmp_path / f"{name}.log", cache)
    predict_command = [sys.executable, "-m", "seglight.predict", f"ckpt={trained_run}", f"input={scans}"]
    predict_command += [f"output={tmp_path / 'masks'}", "device=cpu"]
    processes["predict"] = start(predict_command, tmp_path / "predict.log", cache)
    stop = tmp_path / "stop"
    prune = f"{sys.executable} -m seglight.cache prune max_gb={LIMIT_GB}"
    # Prunes until the others have ended, then once more; stops at the first failure.
    loop = (
        f"n=0; until [ -e {stop} ]; do {prune} || exit 1; n=$((n+1)); done; {prune} || exit 1; echo prunes=$n"
    )
    processes["prune"] = start(["bash", "-c", loop], tmp_path / "prune.log", cache)

    for name in ("a", "b", "predict"):
        processes[name].wait(timeout=600)
    stop.touch()
    processes["prune"].wait(timeout=120)
    for name, process in processes.items():
        assert process.returncode == 0, (name, (tmp_path / f"{name}.log").read_text()[-3000:])
    prunes = int((tmp_path / "prune.log").read_text().split("prunes=")[-1].split()[0])
    assert prunes >= 2, "the pruner ran while the others did"

    for name in datasets:  # every run read its own cases, whole
        record = json.loads((tmp_path / f"check-{name}.json").read_text())
        assert record["checked"] >= 2 and record["mismatches"] == [], (name, record)
    reference = predict(trained_run, tmp_path / "scans", tmp_path / "reference", device="cpu")
    assert sorted(reference.written) == ["p", "q"]
    for name in ("p", "q"):
        masks = [
            nib.load(folder / f"{name}.nii.gz").get_fdata()
            for folder in (tmp_path / "masks", tmp_path / "reference")
        ]
        assert np.array_equal(*masks), name

    total = sum(e.bytes for kind in ("preprocessed", "remote") for e in cache_entries(cache / kind, kind))
    assert total <= LIMIT_GB * GB, f"the caches hold {total} bytes, over the {LIMIT_GB * GB:.0f} allowed"
