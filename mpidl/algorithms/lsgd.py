"""Leader SGD (single and multi-leader, synchronous and asynchronous) and EASGD.

Teng, Gao, Kianifar, Choromanska et al., "Leader Stochastic Gradient Descent for
Distributed Training of Deep Learning Models", arXiv 1905.10395, and its
Extension (multi-leader); EASGD: Zhang, Choromanska, LeCun, arXiv 1412.6651.

Worker i (one MPI rank, a whole flat model x_i), its local step t, eta_t the
learning rate, g_i the stochastic gradient plus weight decay wd x_i, mu the
momentum (torch convention v <- mu v + g; x <- x - eta v; plain SGD for mu = 0).

LSGD (``lsgd``).  Workers form groups (``groups``: all | size | node).
f_i = running average of worker i's last ``window`` minibatch losses.
Global leader xt = x of argmin_i f_i over all workers; local leader xt^j = x of
argmin over group j (one MINLOC allreduce each, ties -> lowest rank; then one
broadcast of the winner's flat parameters: only the leader's model travels).
Step t of worker i in group j:

    x_i <- x_i - eta_t d_i                                   (SGD / momentum step)
    if (t+1) mod tau_G == 0:  cG_i <- xt   (election + broadcast),  aG = lam_G
    elif step_pull and cG_i set and i is not that leader:           aG = p2 / tau_G
    if multi and (t+1) mod tau == 0:  cL_i <- xt^j,                  aL = lam
    elif multi and step_pull and cL_i set and i is not that leader:  aL = p1 / tau
    x_i <- x_i - aL (x_i - cL_i) - aG (x_i - cG_i)           (both pulls from the same x_i)

Single-leader LSGD (``groups = "all"``) has no local term (lambda = 0).  The
"step pull" toward the last stored leader copies cL, cG after every local step
follows the public LSGD code (on by default, p1 = lam and p2 = lam_G unless
set; ``step_pull = false`` gives the paper's plain form: pulls only every
tau / tau_G steps); the last elected leader skips it (its copy is its own
older self), so N = 1 is plain SGD.  The leader's windowed
loss includes the current step's loss; the leader pulls toward itself (no-op).

EASGD (``easgd``), a = beta / N, center c (replicated on every rank when
synchronous):

    if (t+1) mod tau == 0:  d_i = x_i - c;  D = sum_i d_i  (one allreduce)
    x_i <- x_i - eta_t d_i(SGD/momentum) - a d_i;   c <- c + a D   (both from x_i^t, c^t)

Asynchronous variants (``asynchronous = true``).  The leader slot (one per
group and one global) and the EASGD center live in MPI RMA windows
(:class:`mpidl.comm.ModelWindow`, hosted by the scope's rank 0).  At its own
communication steps a worker, under an exclusive lock, reads the slot's header
and publishes its model if the slot is empty, it owns the slot, or its
windowed loss is lower than the published one; otherwise it reads the
published leader and pulls toward it.  EASGD: under an exclusive lock the
worker reads c, sets c <- c + a (x_i - c) and takes x_i <- x_i - a (x_i - c).
Nobody waits for anybody except through these locks.  The driver's step k is a
*round*: every worker makes ``round_steps`` local steps, enters a nonblocking
barrier and keeps stepping until the barrier completes, so fast workers make
more local steps than slow ones (``state.t`` counts a worker's own steps; the
learning rate and minibatch follow t).  The windows' contents (model and header
[version, loss, owner, step]) enter the checkpoint through
``prepare_checkpoint`` (the hosts copy them into their state after a barrier)
and are written back once per process before any worker touches a window.
``deterministic = true``: exactly ``round_steps`` local steps per round and, at
every step that uses a window, the workers' window accesses in rank order (a
token from rank r to r + 1, then a barrier), which gives the serialised result
of the references, bitwise reproducible.  Single-process references:
tests/reference/lsgd.py.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import numpy as np

from mpidl import xp
from mpidl.algorithms.base import check_lr, lr_at
from mpidl.config import LRConfig, register_algorithm

log = logging.getLogger("mpidl.lsgd")

__all__ = ["LSGDConfig", "EASGDConfig", "LSGD", "EASGD", "LSGDState", "EASGDState"]


def _check_common(cfg):
    check_lr(cfg)
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {cfg.momentum}")
    if cfg.round_steps < 1:
        raise ValueError(f"round_steps must be >= 1, got {cfg.round_steps}")
    if cfg.slow_factor < 1.0:
        raise ValueError(f"slow_factor must be >= 1, got {cfg.slow_factor}")
    if cfg.deterministic and not cfg.asynchronous:
        raise ValueError("deterministic = true applies to asynchronous = true only (the synchronous "
                         "variants are deterministic already): set asynchronous = true or drop deterministic")


@dataclass(frozen=True)
class LSGDConfig(LRConfig):
    name: str = "lsgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    groups: str = "all"                 # all (single leader) | size | node (multi-leader)
    group_size: int = 0                 # workers per group when groups = "size"
    lam: float = 0.1                    # local-leader pull lambda (multi-leader only)
    lam_G: float = 0.1                  # global-leader pull lambda_G
    tau: int = 4                        # local-leader period
    tau_G: int = 16                     # global-leader period
    window: int = 10                    # minibatch losses in the running average
    step_pull: bool = True              # pull toward the stored leader copies after every local step
    p1: float = -1.0                    # step-pull weight toward the local copy is p1 / tau (-1: p1 = lam)
    p2: float = -1.0                    # step-pull weight toward the global copy is p2 / tau_G (-1: p2 = lam_G)
    asynchronous: bool = False
    deterministic: bool = False         # async: a fixed serialised schedule (bitwise reproducible)
    round_steps: int = 1                # async: local steps every worker makes per driver step
    slow_rank: int = -1                 # straggler emulation: this rank sleeps after each gradient
    slow_factor: float = 1.0            # ... (slow_factor - 1) x its gradient time

    def validate(self):
        _check_common(self)
        for key in ("lam", "lam_G", "p1", "p2"):
            v = getattr(self, key)
            if key in ("p1", "p2") and v == -1.0:
                continue
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{key} must lie in [0, 1), got {v}")
        for key in ("tau", "tau_G", "window"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.groups not in ("all", "size", "node"):
            raise ValueError(f"groups must be all, size or node, got {self.groups!r}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")
        if self.groups == "size" and self.group_size < 1:
            raise ValueError(f"groups = \"size\" needs group_size >= 1, got {self.group_size}")


def _log_groups(lc, groups):
    """Collective over ``lc.world``. Rank 0 logs the groups: their world ranks and hosts."""
    rows = lc.world.gather((lc.group_id, lc.rank, socket.gethostname()))
    if lc.rank != 0:
        return
    by_group = {}
    for g, r, h in rows:
        by_group.setdefault(g, []).append((r, h))
    parts = []
    for members in list(by_group.values())[:16]:
        hosts = sorted({h for _, h in members})
        parts.append(f"ranks {','.join(str(r) for r, _ in members)} on {','.join(hosts)}")
    more = f"; ... {len(by_group) - 16} more" if len(by_group) > 16 else ""
    log.info("lsgd groups = %s: %d group(s): %s%s", groups, len(by_group), "; ".join(parts), more)


@dataclass(frozen=True)
class EASGDConfig(LRConfig):
    name: str = "easgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta: float = 0.43                  # a = beta / N (0.43: LSGD's EASGD baseline; 0.9 in the EASGD code)
    tau: int = 4                        # communication period
    asynchronous: bool = False
    deterministic: bool = False
    round_steps: int = 1
    slow_rank: int = -1
    slow_factor: float = 1.0

    def validate(self):
        _check_common(self)
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {self.beta}")
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {self.tau}")


@dataclass
class LSGDState:
    x: np.ndarray
    v: np.ndarray                       # momentum buffer (size 0 when momentum = 0)
    cg: np.ndarray                      # stored copy of the global leader
    cl: np.ndarray                      # stored copy of the local leader (size 0 for single leader)
    losses: np.ndarray                  # ring buffer of the last `window` minibatch losses
    nloss: int                          # losses stored (<= window)
    have_g: int                         # 1 once a global leader was elected (or read)
    have_l: int                         # 1 once a local leader was elected (or read)
    lead_g: int                         # rank of the global leader at the last election (-1: none yet)
    lead_l: int                         # rank of the local leader at the last election (-1: none yet)
    t: int                              # this worker's local steps so far
    # async: the leader windows' contents at the last checkpoint, held by each window's host
    # (world rank 0 for the global window, group rank 0 for a group's); size 0 elsewhere
    slot_g: np.ndarray                  # the published global leader's model
    slot_hdr_g: np.ndarray              # its header [version, loss, owner, step]; version 0: empty
    slot_l: np.ndarray                  # the published local leader's model (multi-leader)
    slot_hdr_l: np.ndarray


@dataclass
class EASGDState:
    x: np.ndarray
    v: np.ndarray
    c: np.ndarray                       # center (sync: replicated; async: host's last snapshot)
    t: int                              # this worker's local steps so far
    c_hdr: np.ndarray                   # async, host: the center window's header [version, loss, owner, step]


def _numel(x0) -> int:
    """Values in the flat vector ``x0`` (a NumPy array or a torch tensor)."""
    return int(np.prod(tuple(x0.shape), dtype=np.int64))


class _Worker:
    """Shared parts: SGD/momentum step, straggler emulation, async rounds, windows, close.

    Every model-sized array (state, copies, temporaries) is made like ``x0`` (:mod:`mpidl.xp`):
    NumPy on the CPU, torch tensors on the model's device when it is device-resident; the
    update lines serve both.  Host-only bookkeeping (the loss ring buffer, the window headers)
    stays NumPy.  The RMA windows live in host memory (:class:`mpidl.comm.ModelWindow` stages
    tensors).
    """

    torch_device = True                 # a torch model and this state may live on a GPU (mpidl.device)

    def __init__(self, cfg, *, steps_per_epoch=1, **_):
        self.cfg = cfg
        self.name = cfg.name
        self.steps_per_epoch = int(steps_per_epoch)
        self.lc = None

    def lr(self, t):
        return lr_at(self.cfg, t, self.steps_per_epoch)

    def _grad(self, oracle, x, t):
        t0 = time.perf_counter() if self._slow else 0.0
        loss, g = oracle.loss_grad(x, t)
        if self.cfg.weight_decay:
            g += self.cfg.weight_decay * x
        if self._slow:
            time.sleep((self.cfg.slow_factor - 1.0) * (time.perf_counter() - t0))
        return loss, g

    def _sgd(self, state, g, t):
        lr, mu = self.lr(t), self.cfg.momentum
        if mu:
            state.v *= mu
            state.v += g
            state.x -= lr * state.v
        else:
            state.x -= lr * g

    def _setup(self, x0, comm, groups="all", group_size=0):
        from mpidl.comm import LeaderComm
        self.lc = LeaderComm(comm, groups, group_size)
        if groups != "all":
            _log_groups(self.lc, groups)
        self._slow = self.cfg.slow_factor > 1.0 and self.lc.rank == self.cfg.slow_rank
        self._tmp = xp.empty_like(x0)
        self._first = True

    def step(self, k, state, oracle, comm):
        """Collective. Sync: one local step (with its collectives). Async: one round (see module doc)."""
        if not self.cfg.asynchronous:
            loss = self._local_step(state, oracle)
            self._first = False
            return state, {"loss": loss}
        self._ensure_windows(state)
        if self.cfg.deterministic:      # exactly round_steps local steps; window accesses in rank order
            losses = [self._local_step(state, oracle) for _ in range(self.cfg.round_steps)]
            return state, {"loss": float(np.mean(losses)), "local_steps": len(losses)}
        losses = []
        req = None
        while True:
            losses.append(self._local_step(state, oracle))
            if len(losses) == self.cfg.round_steps:
                req = self.lc.ibarrier()
            if req is not None and req.Test():
                break
        return state, {"loss": float(np.mean(losses)), "local_steps": len(losses)}

    def _ensure_windows(self, state):
        """Collective. Once per process, before any worker touches a window: load the state's copy."""
        if self._first:
            self._restore_windows(state)
            self.lc.barrier()
            self._first = False

    def _talk(self, fn):
        """Collective when deterministic (every worker's ``fn`` in rank order), else Local: ``fn()``."""
        if self.cfg.asynchronous and self.cfg.deterministic:
            return self.lc.in_turn(fn)
        return fn()

    def prepare_checkpoint(self, state, mc):
        """Collective over ``mc``. Async: copy the windows' contents into ``state`` (at each host).

        Called by the driver right before it saves ``state``: after a barrier
        every worker has finished its round, so the copy is consistent with
        every worker's saved state.  Sync: nothing to do.
        """
        if not self.cfg.asynchronous:
            return state
        self._ensure_windows(state)
        mc.barrier()
        self._snapshot_windows(state)
        return state

    def _restore_windows(self, state):
        pass

    def _snapshot_windows(self, state):
        pass

    def close(self):
        """Collective. Free this algorithm's communicators and RMA windows."""
        if self.lc is not None:
            self.lc.close()
            self.lc = None


class LSGD(_Worker):
    state_cls = LSGDState

    def init(self, x0, comm):
        """Collective. Build the groups (and, asynchronous, the leader windows)."""
        cfg = self.cfg
        self._setup(x0, comm, cfg.groups, cfg.group_size)
        self.multi = cfg.groups != "all"
        self.p1 = cfg.lam if cfg.p1 == -1.0 else cfg.p1
        self.p2 = cfg.lam_G if cfg.p2 == -1.0 else cfg.p2
        self.win_g = self.win_l = None
        n = _numel(x0)
        if cfg.asynchronous:
            self.win_g = self.lc.window(n, x0.dtype, "world")
            self.win_l = self.lc.window(n, x0.dtype, "group") if self.multi else None

        def slot(win):
            return xp.zeros_like(x0) if win is not None and win.is_host else xp.zeros(0, like=x0)
        return LSGDState(x=x0, v=xp.zeros_like(x0) if cfg.momentum else xp.zeros(0, like=x0),
                         cg=xp.zeros_like(x0), cl=xp.zeros_like(x0) if self.multi else xp.zeros(0, like=x0),
                         losses=np.zeros(cfg.window), nloss=0, have_g=0, have_l=0, lead_g=-1, lead_l=-1, t=0,
                         slot_g=slot(self.win_g), slot_hdr_g=np.zeros(4),
                         slot_l=slot(self.win_l), slot_hdr_l=np.zeros(4))

    def _restore_windows(self, state):
        for win, x, hdr in ((self.win_g, state.slot_g, state.slot_hdr_g), (self.win_l, state.slot_l, state.slot_hdr_l)):
            if win is not None and win.is_host:
                win.restore(hdr, x)

    def _snapshot_windows(self, state):
        for win, x, hdr in ((self.win_g, state.slot_g, state.slot_hdr_g), (self.win_l, state.slot_l, state.slot_hdr_l)):
            if win is not None and win.is_host:
                hdr[...] = win.snapshot(x)

    @staticmethod
    def windowed_loss(state):
        """Local. Mean of the stored minibatch losses (the last ``window`` ones)."""
        return float(np.mean(state.losses[:state.nloss])) if state.nloss else float("inf")

    def _elect_sync(self, state, scope, copy):
        lc = self.lc
        _, root = lc.elect(self.windowed_loss(state), scope)
        me = lc.rank if scope == "world" else lc.grank
        if me == root:
            copy[...] = state.x
        lc.bcast(copy, root, scope)
        return root if scope == "world" else lc.group_ranks[root]

    def _elect_async(self, state, win, copy):
        f, me = self.windowed_loss(state), self.lc.rank
        published, hdr = win.exchange(state.x, f, me, state.t,
                                      lambda h: h is None or int(h[2]) == me or f < h[1], copy)
        if published:
            copy[...] = state.x
        return int(hdr[2])

    def _elections(self, state, glob, loc):
        asy = self.cfg.asynchronous
        if glob:
            if asy:
                state.lead_g = self._elect_async(state, self.win_g, state.cg)
            else:
                state.lead_g = self._elect_sync(state, "world", state.cg)
            state.have_g = 1
        if loc:
            if asy:
                state.lead_l = self._elect_async(state, self.win_l, state.cl)
            else:
                state.lead_l = self._elect_sync(state, "group", state.cl)
            state.have_l = 1

    def _local_step(self, state, oracle):
        cfg, t = self.cfg, state.t
        loss, g = self._grad(oracle, state.x, t)
        self._sgd(state, g, t)
        state.losses[t % cfg.window] = loss
        state.nloss = min(state.nloss + 1, cfg.window)
        glob = (t + 1) % cfg.tau_G == 0
        loc = self.multi and (t + 1) % cfg.tau == 0
        if glob or loc:
            self._talk(lambda: self._elections(state, glob, loc))
        me = self.lc.rank
        pull_g = cfg.step_pull and state.have_g and state.lead_g != me
        aG = cfg.lam_G if glob else (self.p2 / cfg.tau_G if pull_g else 0.0)
        aL = 0.0
        if self.multi:
            pull_l = cfg.step_pull and state.have_l and state.lead_l != me
            aL = cfg.lam if loc else (self.p1 / cfg.tau if pull_l else 0.0)
        if aG or aL:
            d = self._tmp
            d[...] = 0.0
            if aG:
                d += aG * (state.x - state.cg)
            if aL:
                d += aL * (state.x - state.cl)
            state.x -= d
        state.t = t + 1
        return loss

    def leader_model(self, state, mc, out):
        """Collective over ``mc`` (the driver's control communicator). The global leader's model into ``out``.

        Sync: the worker with the lowest windowed loss now (MINLOC + broadcast
        on ``mc``).  Async: the published global leader (rank 0 reads the
        window, then broadcasts).  Returns the leader's rank.
        """
        if self.cfg.asynchronous:
            self._ensure_windows(state)
            mc.barrier()        # every worker has finished its last local step of the round
            hdr = self.win_g.read(out, charge=False) if mc.rank == 0 else None
            owner = mc.bcast(-1 if hdr is None else int(hdr[2]), root=0)
            if owner < 0:
                if mc.rank == 0:
                    out[...] = state.x
                owner = 0
            mc.bcast(out, root=0)
            return owner
        _, owner = mc.argmin(self.windowed_loss(state))
        if mc.rank == owner:
            out[...] = state.x
        mc.bcast(out, root=owner)
        return owner

    def eval_metrics(self, state, session):
        """Collective over ``session.mc``. Test loss/accuracy of the global leader's model."""
        buf = xp.empty_like(state.x)
        owner = self.leader_model(state, session.mc, buf)
        tl, ta = session.evaluate_model(buf)
        return {"leader_test_loss": float(tl), "leader_test_acc": float(ta), "leader_rank": float(owner)}


class EASGD(_Worker):
    state_cls = EASGDState

    def init(self, x0, comm):
        """Collective. a = beta / N; asynchronous: the center window, initialised to x0."""
        self._setup(x0, comm)
        self.a = self.cfg.beta / self.lc.size
        self._sum = xp.empty_like(x0)
        self._cbuf = xp.empty_like(x0)       # the center as the window update hands it to the worker
        hdr = np.zeros(4)
        if self.cfg.asynchronous:
            self.win_c = self.lc.window(_numel(x0), x0.dtype, "world", init=x0)
            if self.win_c.is_host:
                hdr = self.win_c.snapshot(xp.empty_like(x0))       # version 1: x0
        return EASGDState(x=x0, v=xp.zeros_like(x0) if self.cfg.momentum else xp.zeros(0, like=x0),
                          c=xp.copy(x0), t=0, c_hdr=hdr)

    def _local_step(self, state, oracle):
        cfg, t, a = self.cfg, state.t, self.a
        loss, g = self._grad(oracle, state.x, t)
        d = None
        if (t + 1) % cfg.tau == 0:
            d = self._tmp
            if cfg.asynchronous:
                def move(c):
                    xp.subtract(state.x, c, out=d)
                    c += a * d
                self._talk(lambda: self.win_c.update(move, self._cbuf))
            else:
                xp.subtract(state.x, state.c, out=d)
                self.lc.allreduce_sum(d, self._sum)
        self._sgd(state, g, t)
        if d is not None:
            state.x -= a * d
            if not cfg.asynchronous:
                state.c += a * self._sum
        state.t = t + 1
        return loss

    def _restore_windows(self, state):
        if self.win_c.is_host:  # a resumed run restores the center (and its version) from the host's copy
            self.win_c.restore(state.c_hdr, state.c)

    def _snapshot_windows(self, state):
        if self.win_c.is_host:  # the host keeps a copy of the center for checkpoints
            state.c_hdr[...] = self.win_c.snapshot(state.c)

    def center_model(self, state, mc, out):
        """Collective over ``mc``. The center into ``out`` (async: rank 0 reads the window, broadcasts)."""
        if self.cfg.asynchronous:
            self._ensure_windows(state)
            mc.barrier()        # every worker has finished its last local step of the round
            if mc.rank == 0:
                self.win_c.read(out, charge=False)
            mc.bcast(out, root=0)
        else:
            out[...] = state.c
        return out

    def eval_metrics(self, state, session):
        """Collective over ``session.mc``. Test loss/accuracy of the center variable."""
        buf = self.center_model(state, session.mc, xp.empty_like(state.x))
        tl, ta = session.evaluate_model(buf)
        return {"center_test_loss": float(tl), "center_test_acc": float(ta)}


register_algorithm("lsgd", LSGDConfig, LSGD)
register_algorithm("easgd", EASGDConfig, EASGD)
