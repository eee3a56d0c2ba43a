"""Pseudo-labeling (layer 5): the per-shard function, the Dask job over the corpus, and the
cluster factory it runs on."""
