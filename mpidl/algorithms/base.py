"""The protocol every mpidl algorithm follows (optax-style, explicit state).

An algorithm is built from a frozen hyper-parameter config and has two
methods::

    state = algo.init(x0, comm)                  # Collective where it says so
    state, metrics = algo.step(k, state, oracle, comm)

* ``x0`` is this agent's flat float parameter vector (NumPy, float32 or
  float64).  Every agent starts from the same ``x0`` unless an algorithm says
  otherwise.
* ``state`` is a dataclass whose fields are arrays and Python scalars only, so
  :mod:`mpidl.checkpoint` can save and restore any algorithm generically
  (:func:`state_to_dict` / :func:`state_from_dict`).  The arrays are NumPy, or
  torch tensors on the rank's device when the model is device-resident (every
  array is made like ``x0``, :mod:`mpidl.xp`); checkpoints hold NumPy either way,
  so a state saved on a GPU resumes on the CPU and the reverse.  The agent's
  current model is ``state.x``.
* ``oracle`` does local math and never communicates (:class:`Oracle`).
* ``comm`` is a :class:`mpidl.comm.GraphComm`.  Whether a step calls a
  collective depends only on ``(config, k)`` or on values already agreed by a
  collective, so every rank makes the same calls in the same order.
* ``metrics`` is a dict of local Python floats (loss, gradient norm, ...);
  the driver reduces and records them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Tuple

import numpy as np


class Oracle(Protocol):
    """Local loss/gradient provider of one agent (never communicates)."""

    dim: int

    def loss_grad(self, x: np.ndarray, k: int) -> Tuple[float, np.ndarray]:
        """Local. Loss and gradient of the minibatch used at step ``k``, at ``x``.

        The minibatch is a pure function of (seed, rank, k), so a resumed run
        sees the same batches.  The returned gradient array may be reused by
        the next call: copy it if you keep it.
        """


class Algorithm(Protocol):
    name: str

    def init(self, x0: np.ndarray, comm) -> Any: ...

    def step(self, k: int, state: Any, oracle: Oracle, comm) -> Tuple[Any, dict]: ...


def state_to_dict(state) -> dict:
    """Local. Dataclass state -> {field: NumPy array or scalar}.

    NumPy arrays and CPU tensors are not copied (a tensor becomes its NumPy
    view); a device tensor is copied to the host, so what a checkpoint holds
    does not depend on the device.
    """
    from mpidl import xp
    out = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if xp.is_tensor(v):
            v = xp.to_numpy(v)
        elif not (isinstance(v, (np.ndarray, int, float, bool, str)) or v is None):
            raise TypeError(f"state field {f.name!r} has type {type(v).__name__}; "
                            "states hold arrays (NumPy or torch) and Python scalars only")
        out[f.name] = v
    return out


def state_from_dict(cls, d: dict, like=None):
    """Local. Rebuild a state dataclass; with ``like``, arrays are copied into its buffers.

    Copying into ``like``'s arrays keeps zero-copy links (for example ``x``
    being a view of a torch model's flat parameter buffer) intact on resume; a
    ``like`` field that is a tensor (on any device) gets the saved values copied
    to it.
    """
    from mpidl import xp
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            raise KeyError(f"checkpointed state lacks field {f.name!r}")
        v = d[f.name]
        buf = getattr(like, f.name) if like is not None else None
        if isinstance(buf, np.ndarray) or xp.is_tensor(buf):
            arr = np.asarray(v)
            if tuple(arr.shape) != tuple(buf.shape):
                raise ValueError(f"state field {f.name!r}: shape {arr.shape} != {tuple(buf.shape)}")
            if xp.is_tensor(buf):
                if not (buf.device.type == "cpu" and np.shares_memory(arr, buf.detach().numpy())):
                    xp.assign(buf, arr)
            elif arr is not buf:      # a checkpoint read in place already filled buf
                buf[...] = arr
            v = buf
        kwargs[f.name] = v
    return cls(**kwargs)


def lr_at(cfg, k: int, steps_per_epoch: int) -> float:
    """Local. Learning rate of step ``k`` for an :class:`mpidl.config.LRConfig`-like config.

    constant: lr;  diminishing: lr / (1 + decay k)^power;
    step: lr * decay^floor(epoch / step_epochs), epoch = k / steps_per_epoch.
    """
    kind = cfg.lr_schedule
    if kind == "constant":
        return cfg.lr
    if kind == "diminishing":
        return cfg.lr / (1.0 + cfg.decay * k) ** cfg.power
    if kind == "step":
        return cfg.lr * cfg.decay ** int((k / max(steps_per_epoch, 1)) // cfg.step_epochs)
    raise ValueError(f"unknown lr_schedule {kind!r}; choose constant, diminishing or step")


def check_lr(cfg):
    """Shared validation for LRConfig-based algorithm configs (raises ValueError naming the key).

    The schedule's keys (:meth:`mpidl.config.LRConfig.validate`), ``weight_decay >= 0`` where the
    config has one, and ``slow_rank >= -1`` / ``slow_factor >= 1`` for the straggler emulation.
    """
    from mpidl.config import LRConfig, check_float, check_int
    LRConfig.validate(cfg)
    if hasattr(cfg, "weight_decay"):
        check_float(cfg, "weight_decay", lo=0)
    if hasattr(cfg, "slow_rank"):
        check_int(cfg, "slow_rank", lo=-1)
