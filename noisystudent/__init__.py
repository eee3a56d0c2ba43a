"""noisystudent: Noisy Student self-training (Xie et al. 2020) as a staged, resumable pipeline.

The subpackages are layers, each importing only those below it (docs/architecture.md):
``config`` -> ``data`` -> ``models``, ``noise``, ``prepare`` -> ``engine`` -> ``labeling`` ->
``tracking`` -> ``stages`` -> ``analysis`` -> ``loop``, ``experiments`` -> ``console`` -> ``cli``.
"""

__version__ = "0.1.0"
