"""The plugins of ``conf/hydra/sweeper/grid.yaml`` and ``conf/hydra/launcher/local.yaml``, where Hydra looks for them.

The behaviour lives in ``seglight.config.sweeps``. Hydra imports every module here whenever any Hydra app starts, so this
one imports nothing heavy.
"""

from seglight.config.sweeps import SweepLauncher, SweepSweeper


class GridSweeper(SweepSweeper):
    """Hydra's basic (grid) sweeper, leaving each job's config errors to the launcher to record."""


class LocalLauncher(SweepLauncher):
    """Jobs one after another in this process; config errors recorded as failed runs; summary.csv on SIGTERM."""
