"""CDSGD, CDMSGD and their baselines: centralized (data-parallel) SGD and FedAvg.

Jiang, Balu, Hegde, Sarkar, "Collaborative Deep Learning in Fixed Topology
Networks", arXiv 1706.07880.  Agent i, step k, g_i = stochastic gradient of
agent i's loss (plus weight decay wd x_i), alpha_k the learning rate:

* CDSGD (paper form, combine-then-adapt, ``form="cta"``, default):
      x_i <- sum_j W_ij x_j - alpha_k g_i(x_i)
  The mix of x is started before the gradient is computed and finished after
  it, so communication overlaps the backward pass.  ``form="atc"``
  (adapt-then-combine) uses x_i <- sum_j W_ij (x_j - alpha_k g_j(x_j)); with
  W = 1/N it is exactly centralized SGD.  ``comm_period = c`` mixes only when
  (k + 1) mod c == 0 and takes a local SGD step otherwise.
* CDMSGD (momentum mu), Nesterov form (default, ``momentum_form="nesterov"``):
      v_i <- mu v_i - alpha_k g_i(x_i);   x_i <- sum_j W_ij x_j + mu v_i - alpha_k g_i(x_i)
  heavy-ball form (``momentum_form="heavy-ball"``):
      x_i <- sum_j W_ij x_j - alpha_k g_i(x_i) + mu (x_i - x_i^prev)
* centralized: g = (1/N) sum_i g_i (one allreduce); v <- mu v + g; x <- x - alpha_k v
  (torch.optim.SGD convention; plain SGD when mu = 0).  All agents hold the same x.
* FedAvg: E local SGD steps, then x_i <- sum_j n_j x_j / sum_j n_j (data-size
  weighted, one allreduce), E = ``local_steps`` or ``local_epochs`` x steps per epoch.

The stacked-matrix references are in tests/reference/cdsgd.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpidl import xp
from mpidl.algorithms.base import check_lr, lr_at
from mpidl.config import LRConfig, register_algorithm

__all__ = ["CDSGDConfig", "CDMSGDConfig", "CentralizedConfig", "FedAvgConfig",
           "CDSGD", "CDMSGD", "Centralized", "FedAvg"]


@dataclass(frozen=True)
class CDSGDConfig(LRConfig):
    name: str = "cdsgd"
    weight_decay: float = 0.0
    comm_period: int = 1
    form: str = "cta"                   # cta (paper) | atc

    def validate(self):
        check_lr(self)
        if self.comm_period < 1:
            raise ValueError(f"comm_period must be >= 1, got {self.comm_period}")
        if self.form not in ("cta", "atc"):
            raise ValueError(f"form must be cta or atc, got {self.form!r}")


@dataclass(frozen=True)
class CDMSGDConfig(LRConfig):
    name: str = "cdmsgd"
    momentum: float = 0.95
    momentum_form: str = "nesterov"     # nesterov | heavy-ball
    weight_decay: float = 0.0

    def validate(self):
        check_lr(self)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.momentum_form not in ("nesterov", "heavy-ball"):
            raise ValueError(f"momentum_form must be nesterov or heavy-ball, got {self.momentum_form!r}")


@dataclass(frozen=True)
class CentralizedConfig(LRConfig):
    name: str = "centralized"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def validate(self):
        check_lr(self)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class FedAvgConfig(LRConfig):
    name: str = "fedavg"
    local_steps: int = 10
    local_epochs: float = 0.0           # > 0 overrides local_steps
    weight_decay: float = 0.0

    def validate(self):
        check_lr(self)
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")
        if not self.local_epochs >= 0:
            raise ValueError(f"local_epochs must be >= 0, got {self.local_epochs}")
        if self.local_steps < 1 and self.local_epochs <= 0:
            raise ValueError("set local_steps >= 1 or local_epochs > 0")


@dataclass
class SGDState:
    x: np.ndarray


@dataclass
class MomentumState:
    x: np.ndarray
    v: np.ndarray                       # momentum buffer (Nesterov / centralized) or x^prev (heavy-ball)


class _Base:
    """Shared parts.  The state is made like ``x0`` (:mod:`mpidl.xp`): NumPy on the CPU, torch tensors
    on the model's device when it is device-resident; the update lines serve both."""

    state_cls = SGDState
    torch_device = True                 # a torch model and this state may live on a GPU (mpidl.device)

    def __init__(self, cfg, *, steps_per_epoch=1, num_samples=1, **_):
        self.cfg = cfg
        self.name = cfg.name
        self.steps_per_epoch = int(steps_per_epoch)
        self.num_samples = int(num_samples)

    def lr(self, k):
        return lr_at(self.cfg, k, self.steps_per_epoch)

    def _grad(self, oracle, x, k):
        loss, g = oracle.loss_grad(x, k)
        if self.cfg.weight_decay:
            g += self.cfg.weight_decay * x
        return loss, g


class CDSGD(_Base):
    def init(self, x0, comm):
        """Local. State x = x0 (used in place: x0 may be a model's parameter buffer)."""
        self._buf = xp.empty_like(x0)
        return SGDState(x=x0)

    def step(self, k, state, oracle, comm):
        """Collective when this step mixes ((k + 1) mod comm_period == 0)."""
        x, lr = state.x, self.lr(k)
        mix_now = (k + 1) % self.cfg.comm_period == 0
        if mix_now and self.cfg.form == "atc":
            loss, g = self._grad(oracle, x, k)
            x -= lr * g
            comm.mix(x, out=x)
            return state, {"loss": loss}
        pending = comm.start_mix(x, out=self._buf) if mix_now else None
        loss, g = self._grad(oracle, x, k)
        g *= lr
        if pending is not None:
            xp.subtract(pending.wait(), g, out=x)
        else:
            x -= g
        return state, {"loss": loss}


class CDMSGD(_Base):
    state_cls = MomentumState

    def init(self, x0, comm):
        self._buf = xp.empty_like(x0)
        v = xp.copy(x0) if self.cfg.momentum_form == "heavy-ball" else xp.zeros_like(x0)
        return MomentumState(x=x0, v=v)

    def step(self, k, state, oracle, comm):
        """Collective (one mix per step)."""
        x, v, lr, mu = state.x, state.v, self.lr(k), self.cfg.momentum
        pending = comm.start_mix(x, out=self._buf)
        loss, g = self._grad(oracle, x, k)
        g *= lr
        mixed = pending.wait()
        if self.cfg.momentum_form == "nesterov":
            v *= mu
            v -= g
            xp.subtract(mixed, g, out=mixed)
            mixed += mu * v
            x[...] = mixed
        else:  # heavy-ball; v holds x^prev
            mixed -= g
            mixed += mu * (x - v)
            v[...] = x
            x[...] = mixed
        return state, {"loss": loss}


class Centralized(_Base):
    state_cls = MomentumState

    def init(self, x0, comm):
        """Local. The gradient's reducer comes from the communicator: with a torch model attached
        and ``[comm] bucket_mb > 0`` it averages buckets while backward runs (mpidl.comm.overlap)."""
        make = getattr(comm, "gradient_mean", None)
        self._mean = make(self.cfg.weight_decay) if make is not None else None
        return MomentumState(x=x0, v=xp.zeros_like(x0))

    def step(self, k, state, oracle, comm):
        """Collective (one allreduce of the gradient, or one per bucket)."""
        x, v, lr, mu = state.x, state.v, self.lr(k), self.cfg.momentum
        if self._mean is not None:      # g <- mean_i (g_i + wd x_i), bucketed or whole
            loss, g = oracle.loss_grad(x, k)
            self._mean.reduce(g, x)
        else:
            loss, g = self._grad(oracle, x, k)
            comm.allreduce(g, op="mean", out=g)
        if mu:
            v *= mu
            v += g
            d = g + mu * v if self.cfg.nesterov else v
            x -= lr * d
        else:
            x -= lr * g
        return state, {"loss": loss}


class FedAvg(_Base):
    def init(self, x0, comm):
        """Collective (one allreduce of the local sample counts)."""
        total = comm.allreduce(float(self.num_samples))
        self.weight = self.num_samples / total
        self.E = (max(1, int(round(self.cfg.local_epochs * self.steps_per_epoch)))
                  if self.cfg.local_epochs > 0 else int(self.cfg.local_steps))
        return SGDState(x=x0)

    def step(self, k, state, oracle, comm):
        """Collective every E-th step (the weighted average)."""
        x, lr = state.x, self.lr(k)
        loss, g = self._grad(oracle, x, k)
        x -= lr * g
        self.average(k, x, comm)
        return state, {"loss": loss}

    def average(self, k, x, comm):
        """Collective every E-th step: x <- sum_j n_j x_j / sum_j n_j (in place); a no-op otherwise."""
        if (k + 1) % self.E == 0:
            x *= self.weight
            comm.allreduce(x, op="sum", out=x)


register_algorithm("cdsgd", CDSGDConfig, CDSGD)
register_algorithm("cdmsgd", CDMSGDConfig, CDMSGD)
register_algorithm("centralized", CentralizedConfig, Centralized)
register_algorithm("fedavg", FedAvgConfig, FedAvg)
