"""seglight.data.caching."""
