"""Linear probes: how much class information a model's hidden states carry, read off with a
logistic regression fit on the labeled train features and scored on held-out features."""

from __future__ import annotations

import warnings

import numpy as np


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    c: float = 1.0,
    max_iter: int = 500,
) -> float:
    """Top-1 of an L2-regularised multinomial logistic regression on standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2 or len(test_y) == 0:
        return float("nan")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    with warnings.catch_warnings():  # a probe that stops at max_iter is still a valid measurement
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(train_x, np.float64), train_y)
    return float((probe.predict(np.asarray(test_x, np.float64)) == test_y).mean())
