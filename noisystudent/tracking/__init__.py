"""MLflow tracking (layer 6): one parent run per loop, one nested run per generation, the model
registry, and comparing generations from any tracking server."""
