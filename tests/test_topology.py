"""Topology: generators, weight rules, checks, spectral gap (pure NumPy)."""
import dataclasses

import numpy as np
import pytest

from mpidl import topology as T

SIZES = [1, 2, 3, 4, 5, 8, 9, 16]


def _all(n):
    yield T.ring(n)
    yield T.path(n)
    yield T.star(n)
    yield T.complete(n)
    yield T.torus(n)
    yield T.exponential(n)
    yield T.erdos_renyi(n, 0.5, seed=1)
    if n & (n - 1) == 0:
        yield T.hypercube(n)


@pytest.mark.parametrize("n", SIZES)
def test_generators_are_valid_mixing_matrices(n):
    for topo in _all(n):
        W = topo.weights
        assert W.shape == (n, n) and topo.size == n
        assert np.allclose(W.sum(1), 1.0)
        assert topo.is_connected()
        assert topo.is_doubly_stochastic(), topo.name
        for i in range(n):
            assert i not in topo.in_neighbors(i) and i not in topo.out_neighbors(i)
            assert len(set(topo.in_neighbors(i))) == len(topo.in_neighbors(i))
            assert list(topo.in_neighbors(i)) == [j for j in range(n) if j != i and W[i, j] != 0]
            assert np.isclose(topo.self_weight(i) + topo.in_weights(i).sum(), 1.0)
        gap = topo.spectral_gap()
        assert (0.0 < gap <= 1.0 + 1e-12) if n > 1 else gap == 1.0
        with pytest.raises(ValueError):
            topo.weights[0, 0] = 2.0  # frozen


def test_two_ring_has_one_neighbour_and_no_duplicate():
    topo = T.ring(2)
    assert topo.in_neighbors(0) == (1,) and topo.out_neighbors(1) == (0,)
    assert np.allclose(topo.weights, 0.5)


def test_single_agent():
    for topo in _all(1):
        assert topo.weights.tolist() == [[1.0]] and topo.in_neighbors(0) == ()


def test_known_weights_and_gaps():
    assert np.allclose(T.ring(5).weights[0], [1 / 3, 1 / 3, 0, 0, 1 / 3])
    assert np.allclose(T.complete(5).weights, 0.2)  # W = 1/N as in the CDSGD paper
    assert np.isclose(T.complete(5).spectral_gap(), 1.0)
    # ring(n) Metropolis: eigenvalues 1/3 + 2/3 cos(2 pi k / n)
    n = 8
    lam2 = max(abs(1 / 3 + 2 / 3 * np.cos(2 * np.pi * k / n)) for k in range(1, n))
    assert np.isclose(T.ring(n).spectral_gap(), 1 - lam2)
    s = T.star(6)
    assert len(s.in_neighbors(0)) == 5 and np.allclose(s.weights[0, 1:], 1 / 6)
    e = T.exponential(8)
    assert e.in_neighbors(0) == (4, 6, 7) and e.out_neighbors(0) == (1, 2, 4)
    assert not e.is_symmetric() and np.allclose(e.weights[0, [0, 4, 6, 7]], 0.25)
    assert T.torus(8).name == "torus(2x4)" and T.torus(9).degree(0) == 4
    assert T.torus(8, shape=(2, 4)).degree(0) == 3  # wrap on the size-2 axis is one edge


def test_weight_rules():
    star = T.star(4, weights="max-degree")
    assert np.allclose(star.weights[1], [0.25, 0.75, 0, 0])
    lazy = T.path(3, weights="lazy")
    assert np.allclose(lazy.weights[1], [0.25, 0.5, 0.25]) and np.allclose(lazy.weights[0], [0.5, 0.5, 0])
    uni = T.path(3, weights="uniform")
    assert np.allclose(uni.weights[1], 1 / 3) and not uni.is_doubly_stochastic()
    with pytest.raises(T.TopologyError, match="doubly stochastic"):
        uni.check(doubly_stochastic=True)
    with pytest.raises(T.TopologyError, match="unknown weight rule"):
        T.ring(4, weights="magic")
    with pytest.raises(T.TopologyError, match="undirected"):
        T.exponential(4, weights="metropolis")


def test_errors():
    with pytest.raises(T.TopologyError, match=">= 1"):
        T.ring(0)
    with pytest.raises(T.TopologyError, match="not connected"):
        T.from_edges(4, [(0, 1), (2, 3)])
    with pytest.raises(T.TopologyError, match="sums to"):
        T.from_matrix([[0.5, 0.4], [0.5, 0.5]])
    with pytest.raises(T.TopologyError, match="non-edge"):
        T.from_matrix(np.full((3, 3), 1 / 3), edges=[(0, 1), (1, 2)])
    with pytest.raises(T.TopologyError, match="power-of-two"):
        T.hypercube(6)
    with pytest.raises(T.TopologyError, match="square"):
        T.Topology(np.ones((2, 3)) / 3)
    with pytest.raises(T.TopologyError, match="NaN"):
        T.Topology([[np.nan]])
    with pytest.raises(T.TopologyError, match="no connected"):
        T.erdos_renyi(10, 0.0, max_tries=5)
    with pytest.raises(T.TopologyError, match="unknown topology"):
        T.make("moebius", 4)
    with pytest.raises(T.TopologyError, match="outside"):
        T.from_edges(3, [(0, 3)])


def test_from_matrix_round_trip_and_equality():
    r = T.ring(6)
    m = T.from_matrix(r.weights, edges=[(i, (i + 1) % 6) for i in range(6)])
    assert m == r and hash(m) == hash(r) and m != T.path(6)
    assert T.erdos_renyi(12, 0.3, seed=7) == T.erdos_renyi(12, 0.3, seed=7)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_schedules(n):
    for sched in (T.one_peer_exponential(n), T.random_matching(n, seed=3)):
        prod = np.eye(n)
        for k in range(12):
            topo = sched(k)
            assert topo == sched(k) and topo.is_doubly_stochastic()
            assert all(topo.degree(i) <= 1 for i in range(n))
            prod = topo.weights @ prod
        if n > 1:  # the union over rounds mixes: the product contracts toward 1/n
            assert np.abs(prod - 1.0 / n).max() < 0.5
    if n & (n - 1) == 0:  # one-peer exponential averages exactly in log2(n) rounds
        s = T.one_peer_exponential(n)
        prod = np.eye(n)
        for k in range(max(1, n.bit_length() - 1)):
            prod = s(k).weights @ prod
        assert np.allclose(prod, 1.0 / n)


def test_topo_cli(capsys):
    from mpidl.__main__ import main
    assert main(["topo", "ring", "8"]) == 0
    out = capsys.readouterr().out
    assert "spectral gap" in out and "agent 7: self 0.3333, in [0, 6]" in out
    assert main(["topo", "exponential", "40"]) == 0
    assert "in-degree histogram: 6: 40" in capsys.readouterr().out
    assert main(["topo", "ring", "0"]) == 2
    assert ">= 1" in capsys.readouterr().err


# -- independent weights (tests added by the third mutation run, docs/testing.md) ------------
# Each graph is built here from its definition and each weight rule applied edge by edge in
# plain NumPy; nothing below calls mpidl.topology.
def _ref_adjacency(name, n):
    """a[i, j] = True when agent i receives from agent j, from the graph's definition."""
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if name == "ring":
                a[i, j] = (i - j) % n in (1, n - 1)
            elif name == "path":
                a[i, j] = abs(i - j) == 1
            elif name == "star":
                a[i, j] = i == 0 or j == 0
            elif name == "complete":
                a[i, j] = True
            elif name == "hypercube":
                a[i, j] = bin(i ^ j).count("1") == 1
            elif name == "exponential":   # i receives from j when i = j + 2^m (mod n), 2^m < n
                a[i, j] = any((j + 2 ** m) % n == i for m in range(n.bit_length()) if 2 ** m < n)
    if name == "torus":
        rows = max(r for r in range(1, n + 1) if n % r == 0 and r * r <= n)
        cols = n // rows
        for i in range(n):
            r, c = divmod(i, cols)
            for rr, cc in ((r, c + 1), (r, c - 1), (r + 1, c), (r - 1, c)):
                j = (rr % rows) * cols + cc % cols
                if j != i:
                    a[i, j] = True
    return a


def _ref_weights(a, rule):
    n = a.shape[0]
    deg = [int(a[i].sum()) for i in range(n)]
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if not a[i, j]:
                continue
            if rule == "metropolis":
                w[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
            elif rule == "max-degree":
                w[i, j] = 1.0 / (1 + max(deg))
            elif rule == "uniform":
                w[i, j] = 1.0 / (1 + deg[i])
            elif rule == "lazy":
                w[i, j] = 1.0 / (2 * deg[i])
        w[i, i] = 1.0 - w[i].sum()
    return w


def _ref_gap(w):
    ev = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    return 1.0 if len(ev) == 1 else 1.0 - ev[1]


GRAPHS = ["ring", "path", "star", "complete", "torus", "hypercube", "exponential"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 9, 12])
def test_weights_and_neighbours_match_independent_construction(n):
    for name in GRAPHS:
        if name == "hypercube" and n & (n - 1):
            continue
        a = _ref_adjacency(name, n)
        rules = ["uniform", "lazy"] if name == "exponential" else ["metropolis", "max-degree", "uniform", "lazy"]
        for rule in rules:
            topo = T.make(name, n, weights=rule)
            want = _ref_weights(a, rule)
            np.testing.assert_allclose(topo.weights, want, rtol=0, atol=1e-15, err_msg=f"{name}({n}) {rule}")
            for i in range(n):
                assert topo.in_neighbors(i) == tuple(int(j) for j in np.flatnonzero(a[i])), (name, n, i)
                assert topo.out_neighbors(i) == tuple(int(j) for j in np.flatnonzero(a[:, i])), (name, n, i)
                assert topo.degree(i) == int(a[i].sum())
                assert topo.self_weight(i) == pytest.approx(want[i, i], abs=1e-15)
                np.testing.assert_allclose(topo.in_weights(i), want[i, a[i]], atol=1e-15)
            assert topo.num_edges == int(a.sum())
            assert topo.is_symmetric() == bool(np.allclose(want, want.T, atol=0))
            assert topo.is_doubly_stochastic() == bool(np.allclose(want.sum(0), 1.0, atol=1e-12))
            assert topo.spectral_gap() == pytest.approx(_ref_gap(want), abs=1e-12)
    # the default rule of each generator: metropolis, uniform for the directed exponential graph
    assert np.allclose(T.ring(n).weights, _ref_weights(_ref_adjacency("ring", n), "metropolis"))
    assert np.allclose(T.exponential(n).weights, _ref_weights(_ref_adjacency("exponential", n), "uniform"))


def test_irregular_graph_weights_and_lazy_isolated_agent():
    # degrees 3, 1, 2, 2 (a triangle 0-2-3 with a pendant 1): every rule differs from the others
    edges = [(0, 1), (0, 2), (2, 3), (3, 0)]
    a = np.zeros((4, 4), dtype=bool)
    for s, d in edges:
        a[s, d] = a[d, s] = True
    for rule in ("metropolis", "max-degree", "uniform", "lazy"):
        np.testing.assert_allclose(T.from_edges(4, edges, weights=rule).weights, _ref_weights(a, rule), atol=1e-15)
    # hand values: metropolis W_01 = 1/(1+3), W_23 = 1/(1+2), W_11 = 3/4
    w = T.from_edges(4, edges).weights
    assert w[0, 1] == 0.25 and w[2, 3] == pytest.approx(1 / 3) and w[1, 1] == 0.75
    # lazy with an isolated agent (connected=False): its row is [.., 1, ..]
    lazy = T.from_edges(3, [(0, 1)], weights="lazy", connected=False).weights
    np.testing.assert_array_equal(lazy, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    # a directed edge list: uniform on the in-degree; a self loop is dropped
    d = T.from_edges(3, [(0, 1), (1, 2), (2, 0), (1, 1)], directed=True, weights="uniform")
    np.testing.assert_array_equal(d.weights, [[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    assert d.in_neighbors(1) == (0,) and d.out_neighbors(1) == (2,)


def test_torus_shapes_and_square_factorisation():
    for n in range(1, 31):
        rows = max(r for r in range(1, n + 1) if n % r == 0 and r * r <= n)
        assert T.torus(n).name == f"torus({rows}x{n // rows})"
    t = T.torus(12, shape=(3, 4))
    a = np.zeros((12, 12), dtype=bool)
    for i in range(12):
        r, c = divmod(i, 4)
        for j in (r * 4 + (c + 1) % 4, r * 4 + (c - 1) % 4, ((r + 1) % 3) * 4 + c, ((r - 1) % 3) * 4 + c):
            a[i, j] = True
    np.testing.assert_allclose(t.weights, _ref_weights(a, "metropolis"), atol=1e-15)
    for shape in ((3, 5), (0, 12), (12, 0), (-3, -4)):
        with pytest.raises(T.TopologyError, match="does not hold 12"):
            T.torus(12, shape=shape)


def test_erdos_renyi_matches_its_definition():
    # G(n, p): upper-triangle pairs in row order, kept when a draw of default_rng(seed) is < p,
    # redrawn (same generator) until the graph is connected
    for n, p, seed in ((6, 0.3, 0), (9, 0.4, 3), (5, 1.0, 1), (1, 0.5, 0), (2, 0.7, 2)):
        rng = np.random.default_rng(seed)
        iu = [(i, j) for i in range(n) for j in range(i + 1, n)]
        while True:
            keep = rng.random(len(iu)) < p
            a = np.eye(n, dtype=bool)
            for (i, j), k in zip(iu, keep):
                a[i, j] = a[j, i] = bool(k)
            reach = np.linalg.matrix_power(a.astype(float), max(n, 1)) > 0
            if reach.all():
                break
        np.fill_diagonal(a, False)
        topo = T.erdos_renyi(n, p, seed=seed)
        np.testing.assert_allclose(topo.weights, _ref_weights(a, "metropolis"), atol=1e-15)
        assert topo.name == f"erdos_renyi({n},{p},seed={seed})"
    for p in (-0.1, 1.5):
        with pytest.raises(T.TopologyError, match="must lie in"):
            T.erdos_renyi(4, p)
    assert T.erdos_renyi(4, 0.0 + 1.0).num_edges == 12  # p = 1: complete
    with pytest.raises(T.TopologyError, match=r"ln\(n\)/n = 0\.230"):
        T.erdos_renyi(10, 0.0, max_tries=2)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_schedules_match_their_definitions(n):
    rounds = max(1, int(np.ceil(np.log2(n)))) if n > 1 else 1
    ope = T.one_peer_exponential(n)
    rm = T.random_matching(n, seed=4)
    for k in range(7):
        m = 2 ** (k % rounds)
        want = np.eye(n) if n == 1 else 0.5 * np.eye(n)
        if n > 1:
            for i in range(n):
                want[i, (i - m) % n] += 0.5
        np.testing.assert_array_equal(ope(k).weights, want)
        perm = np.random.default_rng([4, k]).permutation(n)
        want = np.eye(n)
        for t in range(0, n - 1, 2):
            i, j = perm[t], perm[t + 1]
            want[i, i] = want[j, j] = want[i, j] = want[j, i] = 0.5
        np.testing.assert_array_equal(rm(k).weights, want)
        assert ope(k).name == f"one_peer_exponential({n}, shift={0 if n == 1 else m})"
        assert rm(k).name == f"random_matching({n}, seed=4, step={k})"
        perm = np.random.default_rng([0, k]).permutation(n)   # the default seed is 0
        assert all(T.random_matching(n)(k).weights[perm[t], perm[t + 1]] == 0.5 for t in range(0, n - 1, 2))


def test_checks_and_messages():
    for bad in (2.0, True, "4", None):
        with pytest.raises(T.TopologyError, match="must be an integer"):
            T.ring(bad)
    assert T.ring(np.int64(3)).size == 3
    with pytest.raises(T.TopologyError, match="at least one agent"):
        T.Topology(np.zeros((0, 0)))
    with pytest.raises(T.TopologyError, match=r"row 1 of the mixing matrix sums to 0\.9.*1 bad row"):
        T.Topology([[1.0, 0.0], [0.4, 0.5]])
    T.Topology([[1.0, 0.0], [0.5, 0.5 + 5e-11]])      # inside ROW_TOL = 1e-10
    with pytest.raises(T.TopologyError, match="sums to"):
        T.Topology([[1.0, 0.0], [0.5, 0.5 + 5e-10]])
    with pytest.raises(T.TopologyError, match="edge 'ab' is not a pair"):
        T.from_edges(3, ["ab"])
    for e in ((-1, 0), (0, -1), (0, 3), (3, 0)):
        with pytest.raises(T.TopologyError, match=r"outside 0\.\.2"):
            T.from_edges(3, [e, (0, 1), (1, 2)])
    T.from_edges(3, [(0, 2), (2, 1)])                 # the largest index n - 1 is valid
    with pytest.raises(T.TopologyError, match=r"W\[0, 2\] = 0\.3.*agent 0 does not receive from agent 2"):
        T.from_matrix([[0.4, 0.3, 0.3], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], edges=[(0, 1), (1, 2)])
    # a directed edge list: W may only use the directed edges given
    with pytest.raises(T.TopologyError, match="non-edge"):
        T.from_matrix([[0.5, 0.5], [0.5, 0.5]], edges=[(0, 1)], directed=True)
    T.from_matrix([[1.0, 0.0], [0.5, 0.5]], edges=[(0, 1)], directed=True, connected=False)
    col = T.from_matrix([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.75, 0.25]])
    with pytest.raises(T.TopologyError, match=r"column 1 sums to 1\.5"):
        col.check(doubly_stochastic=True)
    with pytest.raises(T.TopologyError, match="not connected"):
        T.Topology([[1.0, 0.0], [0.5, 0.5]]).check()   # 0 never hears from 1
    assert T.Topology([[1.0, 0.0], [0.5, 0.5]]).check(connected=False).size == 2
    assert T.make("erdos-renyi", 6, p=0.5, seed=2) == T.erdos_renyi(6, 0.5, seed=2)
    assert T.make("ring", 4) == T.ring(4) and T.make("path", 4, weights="lazy") == T.path(4, weights="lazy")


def test_summary_reports_the_graph():
    s = T.star(5).summary()
    assert s == ("star(5): 5 agents, 8 directed edges, in-degree min/max 1/4, symmetric, "
                 f"doubly stochastic, spectral gap {_ref_gap(_ref_weights(_ref_adjacency('star', 5), 'metropolis')):.6f}")
    e = T.exponential(6).summary()
    assert "18 directed edges" in e and "in-degree min/max 3/3" in e  # shifts 1, 2, 4 and "directed, doubly stochastic" in e
    p = T.path(4, weights="uniform").summary()
    assert "symmetric" not in p and "row stochastic" in p
    assert repr(T.ring(3)) == "Topology(name='ring(3)', size=3, edges=6)"


def test_directed_irregular_and_small_inputs():
    # in-degrees (row sums) 1, 1, 2 differ from out-degrees 2, 1, 1: uniform and lazy use in-degrees
    edges = [(0, 1), (0, 2), (1, 2), (2, 0)]
    a = np.zeros((3, 3), dtype=bool)
    for s, d in edges:
        a[d, s] = True
    for rule in ("uniform", "lazy"):
        got = T.from_edges(3, edges, directed=True, weights=rule).weights
        np.testing.assert_allclose(got, _ref_weights(a, rule), atol=1e-15)
    np.testing.assert_allclose(T.from_edges(3, edges, directed=True, weights="uniform").weights[2],
                               [1 / 3, 1 / 3, 1 / 3])
    # from_matrix checks connectivity by default
    with pytest.raises(T.TopologyError, match="not connected"):
        T.from_matrix(np.eye(2))
    for make in (T.ring, T.one_peer_exponential, T.random_matching):
        with pytest.raises(T.TopologyError, match="number of agents must be >= 1, got 0"):
            make(0)


def test_errors_name_the_first_bad_row_and_the_worst_column():
    """The messages point at the right agent: the first row off 1, the column furthest from 1."""
    w = np.eye(4)
    w[1, 1], w[3, 3] = 0.5, 0.25                      # rows 1 and 3 sum to 0.5 and 0.25
    with pytest.raises(T.TopologyError, match=r"row 1 of the mixing matrix sums to 0\.5, not 1 \(2 bad row"):
        T.Topology(w)
    w = np.array([[0.1, 0.5, 0.4], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])   # columns 0.1, 1.5, 1.4
    with pytest.raises(T.TopologyError, match=r"column 0 sums to 0\.1"):
        T.Topology(w, "t").check(connected=False, doubly_stochastic=True)


def test_topology_is_immutable():
    t = T.Topology(np.full((2, 2), 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "other"
    with pytest.raises(ValueError):
        t.weights[0, 0] = 1.0


def test_erdos_renyi_defaults_and_its_error():
    """The default seed is 0; with p = 0 it gives up after max_tries = 1000 draws, and the hint
    is ln(max(n, 2)) / n (ln 2 / 2 = 0.347 for two agents)."""
    assert np.array_equal(T.erdos_renyi(8, 0.5).weights, T.erdos_renyi(8, 0.5, seed=0).weights)
    assert not np.array_equal(T.erdos_renyi(8, 0.5).weights, T.erdos_renyi(8, 0.5, seed=1).weights)
    with pytest.raises(T.TopologyError, match=r"no connected G\(2, 0\.0\) in 1000 samples; .* = 0\.347\)"):
        T.erdos_renyi(2, 0.0)
