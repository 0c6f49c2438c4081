"""Score a checkpoint on the validation cases, as ``trainer.validate`` does in a notebook, in every process that
torchrun starts: ``torchrun --nproc_per_node 2 -m tests.ddp_validate <ckpt> <output folder> <overrides...>``.

Global rank 0 writes the metrics it logged to ``<output folder>/metrics.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from seglight import build, compose


def main(ckpt: str, output_dir: str, *overrides: str) -> None:
    """Validate ``ckpt`` with the config that ``overrides`` compose; metrics to ``output_dir``/metrics.json."""
    cfg = compose(list(overrides), output_dir=output_dir)
    datamodule, module, trainer = build(cfg)
    trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    if trainer.is_global_zero:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # As PyTorch asks of a script that initialised torch.distributed: a process group left to the interpreter's
    # shutdown can abort the process (gloo's threads), after all the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
