"""noisystudent: Noisy Student self-training (Xie et al. 2020) as a staged, resumable pipeline.

Stages live in :mod:`noisystudent.loop`; the typed config in :mod:`noisystudent.config`; the
shard schema and read-time selection in :mod:`noisystudent.data.pseudo_labels`.
"""

__version__ = "0.1.0"
