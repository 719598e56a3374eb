"""Graph topologies and mixing matrices (pure NumPy; no MPI, no torch).

A :class:`Topology` is a frozen value object around a mixing matrix ``W``
(n x n, float64).  Row i holds the weights agent i applies to what it
receives: one consensus mix is

    x_i <- W_ii x_i + sum_{j in N_i} W_ij x_j                (ALGORITHMS.md section 0)

Neighbour lists are read from the nonzeros of ``W``, never from index
arithmetic, so the 1-agent graph and the 2-ring (whose left and right
neighbour are the same agent) have no duplicate edges and no self loops.

Weight rules for an undirected graph with degrees d_i:

* ``metropolis`` (default): W_ij = 1 / (1 + max(d_i, d_j)) on edges, the rest
  on the diagonal.  Symmetric, hence doubly stochastic.
* ``max-degree``: W_ij = 1 / (1 + d_max) on edges.  Doubly stochastic.
* ``uniform``: W_ij = 1 / (1 + d_i) on the closed in-neighbourhood.
  Row stochastic; doubly stochastic on regular graphs (and the only rule for
  directed graphs such as :func:`exponential`).
* ``lazy``: W_ii = 1/2, W_ij = 1 / (2 d_i).  Row stochastic.

Time-varying graphs are pure functions ``step -> Topology``
(:func:`one_peer_exponential`, :func:`random_matching`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mpidl.errors import MpidlError

__all__ = [
    "Topology", "TopologyError", "WEIGHT_RULES", "GENERATORS",
    "ring", "path", "star", "complete", "torus", "hypercube", "exponential",
    "erdos_renyi", "from_edges", "from_matrix", "make",
    "one_peer_exponential", "random_matching",
]

ROW_TOL = 1e-10
WEIGHT_RULES = ("metropolis", "max-degree", "uniform", "lazy")


class TopologyError(MpidlError, ValueError):
    """A topology or mixing matrix that cannot be used."""


@dataclass(frozen=True, eq=False)
class Topology:
    """Local. Immutable mixing matrix plus the neighbour lists it implies.

    ``Topology(weights, name)`` checks shape, finiteness and that every row
    sums to 1; :meth:`check` adds connectivity and, on request, double
    stochasticity.  Generators call :meth:`check` for you.
    """

    weights: np.ndarray
    name: str = "custom"
    _in: tuple = field(init=False, repr=False)
    _out: tuple = field(init=False, repr=False)

    def __post_init__(self):
        w = np.array(self.weights, dtype=np.float64, copy=True)
        if w.ndim != 2 or w.shape[0] != w.shape[1]:
            raise TopologyError(f"mixing matrix must be square, got shape {w.shape}")
        if w.shape[0] < 1:
            raise TopologyError("a topology needs at least one agent (n >= 1)")
        if not np.all(np.isfinite(w)):
            raise TopologyError("mixing matrix has NaN or infinite entries")
        rows = w.sum(axis=1)
        bad = np.flatnonzero(np.abs(rows - 1.0) > ROW_TOL)
        if bad.size:
            i = int(bad[0])
            raise TopologyError(
                f"row {i} of the mixing matrix sums to {float(rows[i])!r}, not 1 "
                f"({bad.size} bad row(s)); row i holds the weights agent i applies")
        w.setflags(write=False)
        object.__setattr__(self, "weights", w)
        nz = w != 0.0
        np.fill_diagonal(nz, False)
        n = w.shape[0]
        object.__setattr__(self, "_in", tuple(tuple(int(j) for j in np.flatnonzero(nz[i])) for i in range(n)))
        object.__setattr__(self, "_out", tuple(tuple(int(j) for j in np.flatnonzero(nz[:, i])) for i in range(n)))

    # -- value semantics -------------------------------------------------
    def __eq__(self, other):
        return isinstance(other, Topology) and np.array_equal(self.weights, other.weights)

    def __hash__(self):
        return hash((self.weights.shape, self.weights.tobytes()))

    def __repr__(self):
        return f"Topology(name={self.name!r}, size={self.size}, edges={self.num_edges})"

    # -- queries ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self.weights.shape[0]

    @property
    def num_edges(self) -> int:
        """Number of directed edges j -> i with W_ij != 0, i != j."""
        return sum(len(s) for s in self._in)

    def in_neighbors(self, i: int) -> tuple:
        """Agents j != i whose vectors agent i receives (W_ij != 0), ascending."""
        return self._in[i]

    def out_neighbors(self, i: int) -> tuple:
        """Agents j != i that receive agent i's vector (W_ji != 0), ascending."""
        return self._out[i]

    def self_weight(self, i: int) -> float:
        return float(self.weights[i, i])

    def in_weights(self, i: int) -> np.ndarray:
        """W_ij for j in ``in_neighbors(i)``, in that order."""
        return self.weights[i, list(self._in[i])].copy()

    def degree(self, i: int) -> int:
        return len(self._in[i])

    def is_symmetric(self) -> bool:
        return bool(np.array_equal(self.weights, self.weights.T))

    def is_doubly_stochastic(self) -> bool:
        return bool(np.all(np.abs(self.weights.sum(axis=0) - 1.0) <= ROW_TOL))

    def is_connected(self) -> bool:
        """True when the directed support graph is strongly connected."""
        a = self.weights != 0.0
        return _reaches_all(a) and _reaches_all(a.T)

    def spectral_gap(self) -> float:
        """1 - |lambda_2|, lambda_2 the eigenvalue of second largest modulus."""
        if self.size == 1:
            return 1.0
        if self.is_symmetric():
            ev = np.abs(np.linalg.eigvalsh(self.weights))
        else:
            ev = np.abs(np.linalg.eigvals(self.weights))
        ev = np.sort(ev)[::-1]
        return float(1.0 - ev[1])

    def check(self, *, connected: bool = True, doubly_stochastic: bool = False) -> "Topology":
        """Local. Raise :class:`TopologyError` unless the matrix is usable.

        Rows summing to 1 are checked at construction; this adds strong
        connectivity (skip with ``connected=False`` for one member of a
        time-varying schedule) and, if asked, columns summing to 1.
        """
        if connected and not self.is_connected():
            raise TopologyError(
                f"topology {self.name!r} with {self.size} agents is not connected: "
                "consensus cannot reach every agent")
        if doubly_stochastic and not self.is_doubly_stochastic():
            cols = self.weights.sum(axis=0)
            j = int(np.argmax(np.abs(cols - 1.0)))
            raise TopologyError(
                f"topology {self.name!r} is not doubly stochastic: column {j} sums "
                f"to {float(cols[j])!r}; use weights='metropolis' or 'max-degree'")
        return self

    def summary(self) -> str:
        degs = [self.degree(i) for i in range(self.size)]
        return (f"{self.name}: {self.size} agents, {self.num_edges} directed edges, "
                f"in-degree min/max {min(degs)}/{max(degs)}, "
                f"{'symmetric' if self.is_symmetric() else 'directed'}, "
                f"{'doubly' if self.is_doubly_stochastic() else 'row'} stochastic, "
                f"spectral gap {self.spectral_gap():.6f}")


def _reaches_all(a: np.ndarray) -> bool:
    n = a.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j in np.flatnonzero(a[i] & ~seen):
            seen[j] = True
            frontier.append(int(j))
    return bool(seen.all())


# -- weight rules ---------------------------------------------------------

def _need_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TopologyError(f"number of agents must be an integer, got {n!r}")
    if n < 1:
        raise TopologyError(f"number of agents must be >= 1, got {n}")
    return int(n)


def _adjacency(n: int, edges, directed: bool) -> np.ndarray:
    """Boolean adjacency a[i, j] = True when i receives from j."""
    a = np.zeros((n, n), dtype=bool)
    for e in edges:
        try:
            src, dst = (int(v) for v in e)
        except (TypeError, ValueError):
            raise TopologyError(f"edge {e!r} is not a pair of agent indices") from None
        if not (0 <= src < n and 0 <= dst < n):
            raise TopologyError(f"edge {e!r} names an agent outside 0..{n - 1}")
        if src == dst:
            continue
        a[dst, src] = True
        if not directed:
            a[src, dst] = True
    return a


def _weights_from_adjacency(a: np.ndarray, rule: str) -> np.ndarray:
    n = a.shape[0]
    deg = a.sum(axis=1)
    w = np.zeros((n, n))
    symmetric = np.array_equal(a, a.T)
    if rule in ("metropolis", "max-degree") and not symmetric:
        raise TopologyError(
            f"weight rule {rule!r} needs an undirected graph; use 'uniform' for directed graphs")
    if rule == "metropolis":
        ii, jj = np.nonzero(a)
        w[ii, jj] = 1.0 / (1.0 + np.maximum(deg[ii], deg[jj]))
    elif rule == "max-degree":
        w[a] = 1.0 / (1.0 + deg.max()) if n > 1 else 0.0
    elif rule == "uniform":
        w = a / (1.0 + deg)[:, None]
    elif rule == "lazy":
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(a, 0.5 / np.maximum(deg, 1)[:, None], 0.0)
    else:
        raise TopologyError(f"unknown weight rule {rule!r}; choose one of {', '.join(WEIGHT_RULES)}")
    np.fill_diagonal(w, 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def from_edges(n, edges, *, directed=False, weights="metropolis", name="edges",
               connected=True) -> Topology:
    """Topology from an edge list ``[(src, dst), ...]`` (undirected by default)."""
    n = _need_n(n)
    a = _adjacency(n, edges, directed)
    return Topology(_weights_from_adjacency(a, weights), name).check(connected=connected)


def from_matrix(weights, *, edges=None, directed=False, doubly_stochastic=False,
                name="matrix", connected=True) -> Topology:
    """Topology from a user mixing matrix; with ``edges``, W must vanish off them."""
    topo = Topology(weights, name)
    if edges is not None:
        a = _adjacency(topo.size, edges, directed)
        off = (topo.weights != 0.0) & ~a
        np.fill_diagonal(off, False)
        if off.any():
            i, j = (int(v) for v in np.argwhere(off)[0])
            raise TopologyError(
                f"weight W[{i}, {j}] = {float(topo.weights[i, j])!r} is on a non-edge "
                f"(agent {i} does not receive from agent {j})")
    return topo.check(connected=connected, doubly_stochastic=doubly_stochastic)


# -- generators -----------------------------------------------------------

def ring(n, weights="metropolis") -> Topology:
    n = _need_n(n)
    return from_edges(n, [(i, (i + 1) % n) for i in range(n)], weights=weights, name=f"ring({n})")


def path(n, weights="metropolis") -> Topology:
    n = _need_n(n)
    return from_edges(n, [(i, i + 1) for i in range(n - 1)], weights=weights, name=f"path({n})")


def star(n, weights="metropolis") -> Topology:
    """Agent 0 is the hub (degree n - 1)."""
    n = _need_n(n)
    return from_edges(n, [(0, i) for i in range(1, n)], weights=weights, name=f"star({n})")


def complete(n, weights="metropolis") -> Topology:
    """Fully connected; every rule gives W = 1/n."""
    n = _need_n(n)
    return from_edges(n, [(i, j) for i in range(n) for j in range(i + 1, n)],
                      weights=weights, name=f"complete({n})")


def _square_shape(n):
    r = int(math.isqrt(n))
    while n % r:
        r -= 1
    return (r, n // r)


def torus(n, shape=None, weights="metropolis") -> Topology:
    """2-D torus (wrap-around grid); ``shape`` defaults to the most square factorisation."""
    n = _need_n(n)
    rows, cols = _square_shape(n) if shape is None else (int(shape[0]), int(shape[1]))
    if rows * cols != n or rows < 1 or cols < 1:
        raise TopologyError(f"torus shape {shape!r} does not hold {n} agents")
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.append((i, r * cols + (c + 1) % cols))
            edges.append((i, ((r + 1) % rows) * cols + c))
    return from_edges(n, edges, weights=weights, name=f"torus({rows}x{cols})")


def hypercube(n, weights="metropolis") -> Topology:
    n = _need_n(n)
    if n & (n - 1):
        raise TopologyError(f"hypercube needs a power-of-two number of agents, got {n}")
    d = n.bit_length() - 1
    edges = [(i, i ^ (1 << b)) for i in range(n) for b in range(d)]
    return from_edges(n, edges, weights=weights, name=f"hypercube({n})")


def exponential(n, weights="uniform") -> Topology:
    """Directed exponential graph: agent i sends to i + 2^m (mod n) for 2^m < n."""
    n = _need_n(n)
    edges = []
    m = 1
    while m < n:
        edges += [(i, (i + m) % n) for i in range(n)]
        m *= 2
    return from_edges(n, edges, directed=True, weights=weights, name=f"exponential({n})")


def erdos_renyi(n, p, seed=0, weights="metropolis", max_tries=1000) -> Topology:
    """G(n, p), resampled with a seeded generator until connected."""
    n = _need_n(n)
    if not 0.0 <= p <= 1.0:
        raise TopologyError(f"edge probability p must lie in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(n, 1)
    for _ in range(max_tries):
        keep = rng.random(iu[0].size) < p
        a = np.zeros((n, n), dtype=bool)
        a[iu[0][keep], iu[1][keep]] = True
        a |= a.T
        np.fill_diagonal(a, True)
        if _reaches_all(a):
            edges = list(zip(iu[0][keep].tolist(), iu[1][keep].tolist()))
            return from_edges(n, edges, weights=weights, name=f"erdos_renyi({n},{p},seed={seed})")
    raise TopologyError(
        f"no connected G({n}, {p}) in {max_tries} samples; raise p (connectivity "
        f"needs p above about ln(n)/n = {math.log(max(n, 2)) / n:.3f})")


# -- time-varying schedules (pure functions step -> Topology) -------------

def one_peer_exponential(n):
    """Schedule: at step k agent i averages with i - 2^(k mod ceil(log2 n)) (1/2 each)."""
    n = _need_n(n)
    rounds = max(1, (n - 1).bit_length())
    cache = {}

    def schedule(k: int) -> Topology:
        m = 0 if n == 1 else 1 << (int(k) % rounds)
        if m not in cache:
            w = np.eye(n) if n == 1 else 0.5 * np.eye(n)
            if n > 1:
                for i in range(n):
                    w[i, (i - m) % n] += 0.5
            cache[m] = Topology(w, f"one_peer_exponential({n}, shift={m})").check(connected=False)
        return cache[m]

    return schedule


def random_matching(n, seed=0):
    """Schedule: at step k a random perfect matching seeded by (seed, k); pairs average 1/2."""
    n = _need_n(n)

    def schedule(k: int) -> Topology:
        perm = np.random.default_rng([int(seed), int(k)]).permutation(n)
        w = np.eye(n)
        for a, b in zip(perm[0::2], perm[1::2]):
            w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        return Topology(w, f"random_matching({n}, seed={seed}, step={k})").check(connected=False)

    return schedule


GENERATORS = {
    "ring": ring, "path": path, "star": star, "complete": complete,
    "torus": torus, "hypercube": hypercube, "exponential": exponential,
    "erdos_renyi": erdos_renyi,
}


def make(name: str, n: int, *, weights=None, **kwargs) -> Topology:
    """Local. Build a named topology: ``make("ring", 8)``, ``make("erdos_renyi", 8, p=0.4, seed=1)``."""
    key = name.replace("-", "_")
    if key not in GENERATORS:
        raise TopologyError(f"unknown topology {name!r}; choose one of {', '.join(GENERATORS)}")
    if weights is not None:
        kwargs["weights"] = weights
    return GENERATORS[key](n, **kwargs)
