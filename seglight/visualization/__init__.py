"""seglight.visualization."""
