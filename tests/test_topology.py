"""Topology: generators, weight rules, checks, spectral gap (pure NumPy)."""
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
