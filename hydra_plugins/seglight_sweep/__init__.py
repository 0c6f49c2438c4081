"""seglight's Hydra sweeper and launcher; Hydra takes plugins only from the ``hydra_plugins`` namespace package."""
