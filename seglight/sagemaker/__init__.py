"""SageMaker script mode: the lab's estimator hyperparameters and input channels -> a seglight training run.

``sagemaker/train.py`` in the repository is the estimator's ``entry_point``; it calls ``main``.
"""

from seglight.sagemaker.job import main

__all__ = ["main"]
