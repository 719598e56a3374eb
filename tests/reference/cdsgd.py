"""Stacked-matrix references of CDSGD, CDMSGD, centralized SGD and FedAvg.

Row i of X is agent i's parameter vector; W the mixing matrix; lr(k) the
learning-rate schedule; oracles[i].loss_grad(x, k) agent i's gradient.
Written straight from the equations in mpidl/algorithms/cdsgd.py.
"""
import numpy as np


def lr_schedule(kind, lr, decay=0.1, power=1.0, step_epochs=10.0, steps_per_epoch=1):
    """The learning rate alpha_k as a function of the step k, written from the config's
    documentation (not from mpidl.algorithms.base.lr_at):

    constant: lr;  diminishing: lr (1 + decay k)^(-power);
    step: lr decay^floor(e / step_epochs) with epoch e = k / steps_per_epoch.
    """
    if kind == "constant":
        return lambda k: float(lr)
    if kind == "diminishing":
        return lambda k: float(lr * np.power(1.0 + decay * k, -power))
    if kind == "step":
        return lambda k: float(lr * decay ** np.floor(k / steps_per_epoch / step_epochs))
    raise ValueError(kind)


def lr_of(cfg, steps_per_epoch):
    """:func:`lr_schedule` for the fields of an algorithm config (values only)."""
    return lr_schedule(cfg.lr_schedule, cfg.lr, cfg.decay, cfg.power, cfg.step_epochs, steps_per_epoch)


def _grads(oracles, X, k, wd):
    return np.stack([o.loss_grad(X[i].copy(), k)[1].copy() + wd * X[i] for i, o in enumerate(oracles)])


def cdsgd(W, x0, oracles, steps, lr, wd=0.0, comm_period=1, form="cta"):
    X = np.tile(x0, (len(oracles), 1))
    for k in range(steps):
        G = _grads(oracles, X, k, wd)
        if (k + 1) % comm_period:
            X = X - lr(k) * G
        elif form == "cta":
            X = W @ X - lr(k) * G
        else:
            X = W @ (X - lr(k) * G)
    return X


def cdmsgd(W, x0, oracles, steps, lr, mu, form="nesterov", wd=0.0):
    X = np.tile(x0, (len(oracles), 1))
    V = np.zeros_like(X)
    Xp = X.copy()
    for k in range(steps):
        G = _grads(oracles, X, k, wd)
        if form == "nesterov":
            V = mu * V - lr(k) * G
            X = W @ X + mu * V - lr(k) * G
        else:
            X, Xp = W @ X - lr(k) * G + mu * (X - Xp), X
    return X


def centralized(x0, oracles, steps, lr, mu=0.0, nesterov=False, wd=0.0):
    n = len(oracles)
    X = np.tile(x0, (n, 1))
    v = np.zeros_like(x0)
    for k in range(steps):
        g = _grads(oracles, X, k, wd).mean(0)
        v = mu * v + g
        d = g + mu * v if nesterov else v
        X = X - lr(k) * d
    return X


def fedavg(x0, oracles, steps, lr, E, sizes, wd=0.0):
    X = np.tile(x0, (len(oracles), 1))
    w = np.asarray(sizes, float) / np.sum(sizes)
    for k in range(steps):
        X = X - lr(k) * _grads(oracles, X, k, wd)
        if (k + 1) % E == 0:
            X[:] = w @ X
    return X


def sgd(x0, oracle, steps, lr, wd=0.0):
    x = x0.copy()
    for k in range(steps):
        _, g = oracle.loss_grad(x.copy(), k)
        x = x - lr(k) * (g + wd * x)
    return x
