"""seglight.core."""
