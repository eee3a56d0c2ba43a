"""Offline preparation, kept apart from training: the embedded default dataset and folder -> shards."""
