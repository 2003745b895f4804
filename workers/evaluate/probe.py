"""The linear probe: frozen features -> (StandardScaler +) LogisticRegression fitted on train -> test accuracy.

The same probe scores the encoder's pooled features, the random-init encoder's (baseline_accuracy) and the
raw inputs (raw_accuracy, baselines.py), so the three numbers differ only in the representation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from model.config import Config
from model.encoder import Encoder

from .common import log
from .data import Split
from .features import features

MAX_ITER = 2000
PROBE = f"StandardScaler + LogisticRegression(max_iter={MAX_ITER}, random_state=0)"


def fit_probe(x_train, y_train: np.ndarray, x_test, y_test: np.ndarray, scale: bool = True,
              what: str = "probe") -> float:
    """(N, F) train features -> the probe -> accuracy on (M, F) test features. `scale=False` for sparse
    TF-IDF rows: they are already L2-normalised, and centring them would make them dense."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(max_iter=MAX_ITER, random_state=0)
    probe = make_pipeline(StandardScaler(), lr) if scale else lr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log(f"evaluate: {what}: the logistic regression did not converge in {MAX_ITER} iterations")
    return float(probe.score(x_test, y_test))


def labels(items) -> np.ndarray:
    return np.array([y for _, y in items])


def linear_probe(enc: Encoder, cfg: Config, split: Split, tokenizer: Path | None, batch_size: int,
                 device: torch.device, what: str = "model") -> float:
    """Frozen pooled features of `enc` -> the probe -> test accuracy."""
    x_train = features(enc, cfg, split.train, tokenizer, batch_size, device, f"{what} features train")
    x_test = features(enc, cfg, split.test, tokenizer, batch_size, device, f"{what} features test")
    return fit_probe(x_train, labels(split.train), x_test, labels(split.test), what=what)
