"""Start the lab's training job on SageMaker with seglight: the estimator, as the lab runs it.

Run on your own machine, from the repository (never in the container):

    python sagemaker/launch.py --prepare                  # seglight's wheel + requirements.txt into sagemaker/
    python sagemaker/launch.py --role arn:aws:iam::123456789012:role/SageMakerRole --bucket my-bucket
    python sagemaker/launch.py ... --gpus 4               # one ml.g5.12xlarge, torchrun, one process per GPU
    python sagemaker/launch.py ... --epochs 20            # same --run: continues the run from its checkpoints
    python sagemaker/launch.py ... --set data.spatial_size=[96,96,64] --set loss=dicece   # any seglight option

Needs the SageMaker Python SDK v2 (``pip install "sagemaker>=2.200,<3"``: v3 has no estimators) and AWS
credentials. Nothing here runs in tests.

How seglight gets into the container: SageMaker's PyTorch container pip-installs the ``requirements.txt`` of
the ``source_dir`` before it runs the entry point. ``--prepare`` builds seglight's wheel from this checkout
into ``sagemaker/wheels/`` and writes ``requirements.txt`` naming it, so the job runs exactly this code (no
PyPI release needed); the wheel's dependencies (Lightning, MONAI, Hydra...) come from PyPI, torch is the
container's own. Both files are generated (git-ignored): prepare again after changing seglight.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SOURCE_DIR = Path(__file__).resolve().parent
REPO = SOURCE_DIR.parent
# The lab's estimator: MONAI's SegResNet, five hyperparameters, PyTorch 2.4 container, one A10G GPU.
LAB_HYPERPARAMETERS = {
    "model_name": "SegResNet",
    "epochs": 10,
    "batch_size": 2,
    "lr": 1e-4,
    "val_interval": 2,
}
FRAMEWORK_VERSION, PY_VERSION = "2.4.0", "py311"
# The SDK accepts torch_distributed (torchrun) with the 2.5.1 training container, not with 2.4.0.
DISTRIBUTED_FRAMEWORK_VERSION = "2.5.1"
INSTANCE_TYPES = {1: "ml.g5.xlarge", 4: "ml.g5.12xlarge", 8: "ml.g5.48xlarge"}


def prepare(source_dir: Path = SOURCE_DIR, repo: Path = REPO) -> Path:
    """Build seglight's wheel into ``source_dir/wheels`` and name it in ``source_dir/requirements.txt``."""
    wheels = source_dir / "wheels"
    wheels.mkdir(exist_ok=True)
    for old in wheels.glob("seglight-*.whl"):
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(repo)], check=True
    )
    wheel = next(wheels.glob("seglight-*.whl"))
    # Relative to the source_dir: the container runs pip from there (/opt/ml/code).
    (source_dir / "requirements.txt").write_text(f"./wheels/{wheel.name}\n")
    return wheel


def estimator(
    role: str,
    bucket: str,
    run: str,
    job_name: str,
    gpus: int = 1,
    instance_type: str | None = None,
    spot: bool = True,
    hyperparameters: dict[str, Any] | None = None,
) -> Any:
    """The SageMaker PyTorch estimator for the lab's job, with spot restarts and TensorBoard output."""
    from sagemaker.debugger import TensorBoardOutputConfig
    from sagemaker.pytorch import PyTorch

    runs = f"s3://{bucket}/segmentation/runs/{run}"
    return PyTorch(
        entry_point="train.py",
        source_dir=str(SOURCE_DIR),
        role=role,
        framework_version=DISTRIBUTED_FRAMEWORK_VERSION if gpus > 1 else FRAMEWORK_VERSION,
        py_version=PY_VERSION,
        instance_type=instance_type or INSTANCE_TYPES[gpus],
        instance_count=1,
        hyperparameters={**LAB_HYPERPARAMETERS, **(hyperparameters or {})},
        output_path=runs,  # model.tar.gz: <runs>/<job>/output/model.tar.gz
        # /opt/ml/checkpoints <-> S3, restored when SageMaker restarts a reclaimed spot job; a later job with the
        # same run name (and more epochs) continues from the same last.ckpt.
        checkpoint_s3_uri=f"{runs}/checkpoints",
        use_spot_instances=spot,
        max_run=24 * 3600,
        max_wait=48 * 3600 if spot else None,  # spot: how long to wait for capacity, training time included
        # seglight writes event files to /opt/ml/output/tensorboard, the container path of this config.
        tensorboard_output_config=TensorBoardOutputConfig(
            s3_output_path=f"{runs}/{job_name}/tensorboard",
            container_local_output_path="/opt/ml/output/tensorboard",
        ),
        # Several GPUs: the container starts one process per GPU with torchrun; seglight trains data-parallel.
        distribution={"torch_distributed": {"enabled": True}} if gpus > 1 else None,
    )


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as JSON when they parse (numbers, lists, true/false)."""
    extra: dict[str, Any] = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            extra[key] = json.loads(text)
        except ValueError:
            extra[key] = text
    return extra


def main() -> None:
    """Command line: prepare the source_dir, then (unless --prepare) start the job."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prepare", action="store_true", help="only build the wheel and requirements.txt")
    parser.add_argument("--role", help="SageMaker execution role ARN")
    parser.add_argument("--bucket", help="S3 bucket of the data, checkpoints and outputs")
    parser.add_argument("--training", help="training channel (default s3://<bucket>/segmentation/processed/)")
    parser.add_argument("--validation", help="optional validation channel")
    parser.add_argument(
        "--run", default="segresnet", help="run name: jobs with the same name share checkpoints"
    )
    parser.add_argument("--gpus", type=int, default=1, choices=sorted(INSTANCE_TYPES))
    parser.add_argument("--instance-type", help="instead of the g5 instance for --gpus")
    parser.add_argument("--on-demand", action="store_true", help="no spot instances")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any seglight option")
    parser.add_argument("--no-wait", action="store_true", help="return once the job has started")
    args = parser.parse_args()

    wheel = prepare()
    print(f"source_dir {SOURCE_DIR}: {wheel.name} + requirements.txt")
    if args.prepare:
        return
    if not (args.role and args.bucket):
        parser.error("--role and --bucket are needed to start a job (or give --prepare)")
    hyperparameters = parse_set(args.set)
    if args.epochs:
        hyperparameters["epochs"] = args.epochs
    job_name = f"seglight-{args.run}-{time.strftime('%Y%m%d-%H%M%S')}"
    job = estimator(
        args.role,
        args.bucket,
        args.run,
        job_name,
        gpus=args.gpus,
        instance_type=args.instance_type,
        spot=not args.on_demand,
        hyperparameters=hyperparameters,
    )
    channels = {"training": args.training or f"s3://{args.bucket}/segmentation/processed/"}
    if args.validation:
        channels["validation"] = args.validation
    job.fit(channels, job_name=job_name, wait=not args.no_wait)


if __name__ == "__main__":
    main()
