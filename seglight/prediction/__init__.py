"""seglight.prediction."""
