"""Softmax regression, one epoch of minibatch SGD, on data written by bench/network.R."""

import os

import numpy as np

_cache = {}


def load(data_dir, partition, n_features):
    """Partition `partition`'s data: x (n x p float64, row-major), y (int32 class codes from 0)."""
    key = (data_dir, partition)
    if key not in _cache:
        x = np.fromfile(os.path.join(data_dir, f"part{partition:02d}_x.f64"), dtype="<f8")
        y = np.fromfile(os.path.join(data_dir, f"part{partition:02d}_y.i32"), dtype="<i4")
        _cache[key] = (x.reshape(len(y), n_features), y)
    return _cache[key]


def train_epoch(w, b, x, y, lr, batch_size, rng):
    """One epoch of plain SGD on the softmax cross-entropy; returns w, b and the mean loss."""
    n = x.shape[0]
    order = rng.permutation(n)
    losses = 0.0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        logits = xb @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        losses += -np.log(p[np.arange(len(yb)), yb] + 1e-300).sum()
        p[np.arange(len(yb)), yb] -= 1.0
        p /= len(yb)
        w -= lr * (xb.T @ p)
        b -= lr * p.sum(axis=0)
    return w, b, losses / n
