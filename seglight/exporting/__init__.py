"""seglight.exporting."""
