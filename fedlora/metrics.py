"""Classification metrics shared by training-time evaluation and `fedlora eval/compare`
(numpy only, so the CLI can use them without loading torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def macro_f1(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    g, p = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    conf = np.bincount(g * n_classes + p, minlength=n_classes * n_classes)
    conf = conf.reshape(n_classes, n_classes)
    tp = np.diag(conf).astype(float)
    fp, fn = conf.sum(axis=0) - tp, conf.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))
