"""Lightning callbacks, one per module; listed by name in conf/callbacks/default.yaml."""
