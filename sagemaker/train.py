"""SageMaker entry point: trains seglight with the job's hyperparameters on its ``training`` channel.

The estimator's ``entry_point`` (with this folder as ``source_dir``), e.g. in sagemaker/launch.py:

    PyTorch(entry_point="train.py", source_dir="sagemaker", framework_version="2.4.0", py_version="py311",
            hyperparameters={"model_name": "SegResNet", "epochs": 10, "batch_size": 2, "lr": 1e-4,
                             "val_interval": 2}, ...).fit({"training": "s3://bucket/prefix/"})

seglight reaches the container through this folder's requirements.txt, which ``python sagemaker/launch.py
--prepare`` writes next to this file together with seglight's wheel. A plain script, not a package:
SageMaker's torchrun launcher (distribution={"torch_distributed": ...}) runs scripts only.
"""

import os
import sys

try:
    from seglight.sagemaker import main
except ImportError as exc:
    message = (
        f"seglight.sagemaker: error: seglight is not installed in this container ({exc}); build the "
        "source_dir with: python sagemaker/launch.py --prepare (it puts seglight's wheel and requirements.txt "
        "next to train.py)"
    )
    print(message, file=sys.stderr, flush=True)
    failure = os.path.join(os.environ.get("SM_OUTPUT_DIR", "/opt/ml/output"), "failure")
    if os.path.isdir(os.path.dirname(failure)) and not os.path.exists(failure):
        with open(failure, "w") as handle:
            handle.write(message + "\n")
    sys.exit(2)

if __name__ == "__main__":
    main()
