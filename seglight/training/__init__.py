"""seglight.training."""
