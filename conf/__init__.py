"""seglight's Hydra configs; a package so that they ship inside the wheel as ``seglight.conf``.

Hydra imports this package to read the configs, before it instantiates a sweeper and a launcher: registering
seglight's (``hydra/sweeper/grid.yaml``, ``hydra/launcher/local.yaml``) here makes them known to Hydra also in
editable installs, whose ``hydra_plugins`` subpackages Hydra's plugin scan cannot list.
"""

from hydra.core.plugins import Plugins

from hydra_plugins.seglight_sweep.plugins import GridSweeper, LocalLauncher

for _plugin in (GridSweeper, LocalLauncher):
    Plugins.instance().register(_plugin)
