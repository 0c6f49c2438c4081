"""seglight.models."""
