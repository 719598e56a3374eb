"""Stacked-matrix references: row i of X is agent i's vector."""
import numpy as np


def mix(W, X):
    """One consensus round for all agents at once: X <- W X."""
    return np.asarray(W) @ np.asarray(X)
