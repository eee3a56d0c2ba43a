"""Experiments that train extra students (layer 9): the ablation of the student recipe, and the
with/without-low-confidence experiment."""
