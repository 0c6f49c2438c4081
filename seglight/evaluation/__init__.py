"""seglight.evaluation."""
