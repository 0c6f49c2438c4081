"""seglight.config."""
