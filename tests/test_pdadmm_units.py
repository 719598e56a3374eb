"""pdADMM without MPI: the helpers of mpidl/algorithms/pdadmm.py, the construction, init and
iterations of every layer block (the ranks of a path run as threads of this process, passing
their messages through queues).

Fast (a few seconds) so that mutation testing (scripts/mutation.sh, target algorithms-pdadmm-init) can
run it per mutant. Every expected value comes from plain NumPy here
or from tests/reference/pdadmm.py, never from the production function under test; the MPI tests
(tests/mpi/mpitest_pdadmm.py) check the same iterations across real ranks.
"""
import queue
import re
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from mpidl.algorithms import pdadmm as mod
from mpidl.algorithms.pdadmm import PdADMM, PdADMMConfig, layer_blocks
from reference import pdadmm as ref

DOCS = Path(__file__).resolve().parents[1] / "docs" / "algorithms" / "pdadmm.md"


# ---- a path of P ranks as threads ----------------------------------------------------------------
class _Path:
    """Mailboxes between the ranks of a path; one rank computes at a time (``turn``), so the Numba
    kernels are never entered from two threads at once."""

    def __init__(self, size):
        self.size, self.turn, self.failed = size, threading.Lock(), False
        self.boxes = {(i, j, t): queue.Queue() for i in range(size) for j in range(size)
                      for t in (mod._TAG_P, mod._TAG_Q, mod._TAG_INIT, "bcast")}


class _Comm:
    """The calls PdADMM makes on its path communicator: start_exchange (to the neighbours only,
    byte-exact sizes) and bcast."""

    def __init__(self, path, rank):
        self.path, self.rank, self.size = path, rank, path.size
        self.bytes_sent = 0

    def _get(self, src, tag):
        self.path.turn.release()
        try:
            for _ in range(2400):               # 240 s: the first calls compile kernels
                if self.path.failed:
                    raise RuntimeError(f"rank {self.rank}: another rank failed")
                try:
                    return self.path.boxes[(src, self.rank, tag)].get(timeout=0.1)
                except queue.Empty:
                    pass
            raise TimeoutError(f"rank {self.rank}: no message from rank {src} (tag {tag})")
        finally:
            self.path.turn.acquire()

    def start_exchange(self, send, recv, tag=0):
        for j, a in send.items():
            assert abs(j - self.rank) == 1, f"rank {self.rank} sends to {j}: not a neighbour on the path"
            assert a.flags.c_contiguous
            self.path.boxes[(self.rank, j, tag)].put(np.array(a, copy=True))
            self.bytes_sent += a.nbytes
        for i in recv:
            assert abs(i - self.rank) == 1, f"rank {self.rank} receives from {i}: not a neighbour"
        comm = self

        class _Ex:
            def wait(self):
                for i, buf in recv.items():
                    msg = comm._get(i, tag)
                    assert msg.nbytes == buf.nbytes, f"message of {msg.nbytes} bytes into {buf.nbytes}"
                    buf.reshape(-1).view(np.uint8)[...] = msg.reshape(-1).view(np.uint8)
        return _Ex()

    def bcast(self, buf, root=0):
        if self.rank == root:
            for r in range(self.size):
                if r != root:
                    self.path.boxes[(root, r, "bcast")].put(np.array(buf, copy=True))
        else:
            buf[...] = self._get(root, "bcast")
        return buf


def _on_ranks(size, fn):
    """fn(rank, comm) on every rank of a path of ``size`` threads; returns the results by rank."""
    path, out, errors = _Path(size), [None] * size, []

    def body(r):
        with path.turn:
            try:
                out[r] = fn(r, _Comm(path, r))
            except BaseException as e:          # noqa: BLE001 (re-raised in the main thread)
                path.failed = True              # the ranks waiting for this one's messages stop
                errors.append(e)
    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting for a message"
    if errors:
        raise errors[0]
    return out


def _blocks(L, P):
    """[l0, l1) per rank: contiguous, the first L mod P ranks one layer more (docs: Layer parallelism)."""
    sizes = [L // P + (1 if r < L % P else 0) for r in range(P)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(starts[r]), int(starts[r + 1])) for r in range(P)]


CFG = dict(rho=0.5, nu=0.8, tau0=0.5, max_doublings=6, fista_iters=20, fista_tol=1e-12)
DIMS = ([6, 5, 4, 3], [6, 4, 6, 5, 3], [6, 5, 5, 4, 7, 3])


def _layouts():
    return [(d, P) for d in DIMS for P in range(1, len(d))]


def _make(cfg, dims, X, y, r, P, dtype=np.float64):
    l0, l1 = _blocks(len(dims) - 1, P)[r]
    return PdADMM(cfg, dims=dims, n_samples=len(X), rank=r, size=P, dtype=dtype,
                  X=np.ascontiguousarray(X, dtype) if l0 == 0 else None, y=y if l1 == len(dims) - 1 else None)


# ---- module helpers -----------------------------------------------------------------------------
def test_layer_blocks():
    for L in range(1, 8):
        for P in range(1, L + 1):
            got = layer_blocks(L, P)
            assert got == _blocks(L, P), (L, P, got)
            assert all(type(v) is int for blk in got for v in blk)
        with pytest.raises(ValueError, match=f"at most one rank per layer: {L + 1} ranks for {L} layers"):
            layer_blocks(L, L + 1)


def test_row_blocks_cover_the_rows_in_blocks_of_the_documented_size():
    rows = int(re.search(r"row blocks of (\d+)", DOCS.read_text()).group(1))
    assert mod._ROWS == rows
    for n in (0, 1, rows - 1, rows, rows + 1, 3 * rows, 3 * rows + 5):
        want = [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]
        assert mod._row_blocks(n) == want, n


@pytest.mark.parametrize("rows", [3, 10, 4096])
@pytest.mark.parametrize("n_in", [2, 4])
def test_matmul_over_writes_r_w_over_r(monkeypatch, rows, n_in):
    monkeypatch.setattr(mod, "_ROWS", rows)
    rng = np.random.default_rng(n_in)
    R = rng.normal(size=(10, 4))
    W = rng.normal(size=(4, n_in))
    want = R @ W
    buf = np.full(rows * n_in, np.nan)
    G = mod._matmul_over(R, W, buf)
    assert G.shape == (10, n_in) and np.shares_memory(G, R)
    np.testing.assert_allclose(G, want, rtol=1e-14, atol=1e-14)


def test_gram_dot_is_the_float64_sum_of_products():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(7, 5)).astype(np.float32) * 1e3
    B = rng.normal(size=(7, 5)).astype(np.float32)
    want = float(np.sum(A.astype(np.float64) * B.astype(np.float64)))
    got = mod._gram_dot(A, B)
    assert type(got) is float and got == pytest.approx(want, rel=1e-14)


def test_tick_adds_the_seconds_to_the_key_and_the_layer(monkeypatch):
    monkeypatch.setattr(mod.time, "perf_counter", lambda: 7.5)
    times, per = {"p": 1.0, "W": 0.0}, np.zeros(3)
    assert mod._tick(times, "p", 5.0) == 7.5 and times == {"p": 3.5, "W": 0.0}
    assert mod._tick(times, "W", 7.0, per, 2) == 7.5
    assert times == {"p": 3.5, "W": 0.5} and per.tolist() == [0.0, 0.0, 0.5]
    mod._tick(times, "W", 6.5, per)
    assert per.tolist() == [1.0, 0.0, 0.5]


def test_blas_threads_sets_the_blas_limit(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not any(i["user_api"] == "blas" for i in threadpoolctl.threadpool_info()):
        pytest.skip("no BLAS library found by threadpoolctl")
    before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
    try:
        for n in (2, 1):
            mod._blas_threads(n)
            got = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
            assert got and all(v == n for v in got), (n, got)
    finally:
        threadpoolctl.threadpool_limits(limits=min(before.values()), user_api="blas")
    monkeypatch.setitem(__import__("sys").modules, "threadpoolctl", None)     # not installed: no-op
    assert mod._blas_threads(3) is None


# ---- construction and init of every layer block ------------------------------------------------
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("dims,P", _layouts())
def test_init_is_the_forward_pass_on_every_block(dims, P, quantize):
    cfg = PdADMMConfig(**CFG, quantize=quantize, quantize_p=quantize)
    X, y, Ws, bs = ref.problem(dims, n=9, seed=P)
    L, N = len(dims) - 1, len(X)
    S = ref.init(X, Ws, bs, (cfg.grid_lo, cfg.grid_hi, cfg.grid_points) if quantize else None)

    def rank(r, comm):
        algo = _make(cfg, dims, X, y, r, P)
        l0, l1 = _blocks(L, P)[r]
        st = algo.init((Ws[l0:l1], bs[l0:l1]), comm)
        return algo, st, comm.bytes_sent
    for r, (algo, st, nbytes) in enumerate(_on_ranks(P, rank)):
        l0, l1 = _blocks(L, P)[r]
        ls = range(l0, l1)
        assert (algo.L, algo.N, algo.rank, algo.size, algo.l0, algo.l1) == (L, N, r, P, l0, l1)
        assert algo.implicit_u is not quantize and (algo.grid is not None) is quantize
        assert algo.layer_times.tolist() == [0.0] * (l1 - l0) and not any(algo.times.values())
        # the state's flat arrays have the sizes of the documented per-layer blocks
        sizes = {"W": sum(dims[l + 1] * dims[l] for l in ls), "b": sum(dims[l + 1] for l in ls),
                 "z": sum(N * dims[l + 1] for l in ls), "R": sum(N * dims[l + 1] for l in ls),
                 "p": sum(N * dims[l] for l in ls if l >= 1),
                 "q": sum(N * dims[l + 1] for l in ls if l <= L - 2),
                 "u": sum(N * dims[l + 1] for l in ls if l <= L - 2) if quantize else 0,
                 "q_in": N * dims[l0] if r else 0, "u_in": N * dims[l0] if r else 0}
        # quantised runs hold q, q_in and p (quantize_p) as grid indices: uint16 for 1000 points
        idx = {"p", "q", "q_in"} if quantize else set()
        for k, n in sizes.items():
            want = np.uint16 if k in idx else np.float64
            assert getattr(st, k).size == n and getattr(st, k).dtype == want, (r, k)
        for k in ("tau_p", "tau_W"):
            assert getattr(st, k).tolist() == [0.0] * (l1 - l0)
        assert st.rejected.shape == (l1 - l0, 2) and not st.rejected.any()
        assert np.isnan(st.costs).all() and st.costs.size == 3 and st.rho == cfg.rho and np.isnan(st.loss)
        assert not st.R.any() and not st.u.any() and not st.u_in.any()
        # the layer views: the reference's forward pass, in the state's arrays
        wb = algo.weights(st)
        assert len(wb) == l1 - l0
        for j, l in enumerate(ls):
            lay = algo._layers[j]
            assert lay.l == l and np.shares_memory(lay.W, st.W) and np.shares_memory(lay.z, st.z)
            assert wb[j][0] is lay.W and wb[j][1] is lay.b
            np.testing.assert_array_equal(lay.W, Ws[l])
            np.testing.assert_array_equal(lay.b, bs[l])
            np.testing.assert_allclose(lay.z, S["z"][l], rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(algo.as_float(lay.p), S["p"][l], rtol=1e-13, atol=1e-13)
            assert (lay.p is X) if l == 0 else np.shares_memory(lay.p, st.p)
            if l < L - 1:
                np.testing.assert_allclose(algo.as_float(lay.q), S["q"][l], rtol=1e-13, atol=1e-13)
                assert np.shares_memory(lay.q, st.q)
                assert (lay.u is None) if not quantize else np.shares_memory(lay.u, st.u)
            else:
                assert lay.q is None and lay.u is None
        # the block boundary: q of the previous rank's last layer arrived (as sent, bitwise)
        if r:
            np.testing.assert_allclose(algo.as_float(algo.q_in), S["q"][l0 - 1], rtol=1e-13, atol=1e-13)
            assert np.shares_memory(algo.q_in, st.q_in) and np.shares_memory(algo.u_in, st.u_in)
        else:
            assert algo.q_in is None and algo.u_in is None
        assert nbytes == (N * dims[l1] * (2 if quantize else 8) if l1 < L else 0)
        # the duals at the start: 0 (stored, or nu (q - relu z) with q = relu z)
        u = algo.duals(st)
        assert sorted(u) == [l for l in ls if l < L - 1] and all(not v.any() for v in u.values())
        # scratch: S holds the largest narrow layer (l >= 1, n_out < n_in), B a row block of any p
        narrow = [dims[l + 1] for l in ls if l >= 1 and dims[l + 1] < dims[l]]
        assert algo._S.size == N * max(narrow, default=0)
        rb = min(mod._ROWS, mod._QROWS) if quantize else mod._ROWS           # rows per block
        assert algo._rb == rb and algo._B.size == rb * max([dims[l] for l in ls if l >= 1], default=0)
        if l1 == L or quantize:                     # quantize_p: p arrives as indices only
            assert algo._p_recv is None
        else:
            assert algo._p_recv.shape == (N, dims[l1]) and algo._p_recv.dtype == np.float64
        assert algo._ce.shape == (N,)
        if l0 == 0:
            np.testing.assert_allclose(algo._gram0, X.T @ X, rtol=1e-13)
        else:
            assert algo._gram0 is None
        if quantize:
            # no N x width float copy of q or p: the index arrays are the state (and the messages);
            # floats exist only in row blocks of _ROWS rows
            it = np.uint16
            a = algo._pidx_recv
            assert (a is None) if l1 == L else (a.shape == (N, dims[l1]) and a.dtype == it), r
            wmax = max(dims[max(l0, 1):l1 + 1])                 # widths of the stored p and q (not X's)
            assert algo._Fp.size == algo._Fq.size == rb * wmax and algo._Fp.dtype == np.float64
            assert not any(hasattr(algo, k) for k in ("_qidx", "_pidx", "_qidx_send", "_qidx_recv",
                                                       "_pidx_send"))
        else:
            assert algo._pidx_recv is None and algo._Fp is None and algo._Fq is None


def test_duals_and_weights_read_the_state_they_are_given():
    """A state with new arrays (a restored one) before any step: duals() and weights() must read it,
    not the arrays the layer views were bound to."""
    import dataclasses
    dims, N = [6, 5, 4, 3], 9
    cfg = PdADMMConfig(**CFG)
    X, y, Ws, bs = ref.problem(dims, n=N)
    (algo, st), = _on_ranks(1, lambda r, comm: (lambda a: (a, a.init((Ws, bs), comm)))(_make(cfg, dims, X, y, 0, 1)))
    new = dataclasses.replace(st, **{k: getattr(st, k) + 0.25 for k in ("W", "b", "z", "q")})
    w = algo.weights(new)
    algo._bind(st)                              # each accessor meets a state it is not bound to
    u = algo.duals(new)
    zq = [(new.z[:N * 5].reshape(N, 5), new.q[:N * 5].reshape(N, 5)),
          (new.z[N * 5:N * 9].reshape(N, 4), new.q[N * 5:N * 9].reshape(N, 4))]
    for l, (z, q) in enumerate(zq):
        np.testing.assert_allclose(u[l], cfg.nu * (q - np.maximum(z, 0)), rtol=1e-14)
    assert all(np.shares_memory(W, new.W) and np.shares_memory(b, new.b) for W, b in w)
    np.testing.assert_array_equal(w[2][0], Ws[2] + 0.25)
    assert all(np.shares_memory(W, st.W) for W, _ in algo.weights(st))     # and back to the first state
    algo._bind(new)
    assert all(not v.any() for v in algo.duals(st).values())


def test_init_in_float32():
    dims = [6, 5, 4, 3]
    cfg = PdADMMConfig(**CFG)
    X, y, Ws, bs = ref.problem(dims, n=9)
    S = ref.init(X.astype(np.float32), [w.astype(np.float32) for w in Ws], [b.astype(np.float32) for b in bs])

    def rank(r, comm):
        algo = _make(cfg, dims, X, y, r, 2, dtype=np.float32)
        l0, l1 = _blocks(3, 2)[r]
        return algo, algo.init((Ws[l0:l1], bs[l0:l1]), comm)
    for algo, st in _on_ranks(2, rank):
        assert all(a.dtype == np.float32 for a in (st.W, st.b, st.z, st.R, st.p, st.q, st.q_in, st.u_in))
        for lay in algo._layers:
            np.testing.assert_allclose(lay.z, S["z"][lay.l], rtol=1e-5, atol=1e-6)


def test_one_layer_network_on_one_rank():
    cfg = PdADMMConfig(**CFG)
    X, y, Ws, bs = ref.problem([4, 3], n=6)

    def rank(r, comm):
        algo = _make(cfg, [4, 3], X, y, r, 1)
        st = algo.init((Ws, bs), comm)
        for k in range(3):
            st, m = algo.step(k, st, None, comm)
        return algo, st, m
    (algo, st, m), = _on_ranks(1, rank)
    S, costs, _ = ref.run(X, y, Ws, bs, ref.hyper(cfg), 3)
    assert algo.duals(st) == {} and st.p.size == 0 and st.q.size == 0
    np.testing.assert_allclose(st.W.reshape(3, 4), S["W"][0], rtol=1e-10, atol=1e-10)
    assert m["loss"] == pytest.approx(costs[-1], rel=1e-10)


# ---- iterations of every layer block against the stacked reference ------------------------------
def _run(cfg, dims, P, iters, X, y, Ws, bs, restore_at=None):
    L = len(dims) - 1

    def rank(r, comm):
        import dataclasses
        algo = _make(cfg, dims, X, y, r, P)
        l0, l1 = _blocks(L, P)[r]
        st = algo.init((Ws[l0:l1], bs[l0:l1]), comm)
        losses = []
        for k in range(iters):
            if k == restore_at:             # new arrays, as a resume restores them
                st = dataclasses.replace(st, **{f.name: getattr(st, f.name).copy() for f in dataclasses.fields(st)
                                                if isinstance(getattr(st, f.name), np.ndarray)})
            st, m = algo.step(k, st, None, comm)
            losses.append(m["loss"])
        return algo, st, losses, algo.duals(st), [(w.copy(), b.copy()) for w, b in algo.weights(st)]
    return _on_ranks(P, rank)


def _check_against_reference(cfg, dims, P, out, S, costs):
    L = len(dims) - 1
    for r, (algo, st, losses, duals, wb) in enumerate(out):
        l0, l1 = _blocks(L, P)[r]
        scale = lambda a: max(1.0, float(np.abs(a).max()))      # noqa: E731
        for j, l in enumerate(range(l0, l1)):
            lay = algo._layers[j]
            p, q = algo.as_float(lay.p), algo.as_float(lay.q)          # quantised: stored as grid indices
            for key, got in (("W", wb[j][0]), ("b", wb[j][1]), ("z", lay.z), ("p", p), ("q", q)):
                want = S[key][l] if l < len(S[key]) else None
                if got is None or want is None:
                    continue
                assert np.abs(got - want).max() <= 1e-10 * scale(want), (r, l, key)
            # R is the residual z - p W^T - b, kept by bookkeeping
            resid = lay.z - p @ lay.W.T - lay.b
            assert np.abs(lay.R - resid).max() <= 1e-10 * scale(resid), (r, l, "R")
            if l < L - 1:
                assert np.abs(duals[l] - S["u"][l]).max() <= 1e-10 * scale(S["u"][l]), (r, l, "u")
        if r:
            assert np.abs(algo.u_in - S["u"][l0 - 1]).max() <= 1e-10 * scale(S["u"][l0 - 1]), (r, "u_in")
            assert np.abs(algo.as_float(algo.q_in) - S["q"][l0 - 1]).max() <= 1e-10 * scale(S["q"][l0 - 1]), (r, "q_in")
        if l1 == L:
            np.testing.assert_allclose(losses, costs, rtol=1e-10, atol=0)
        else:
            assert all(v is None for v in losses)


@pytest.mark.parametrize("opts", [dict(), dict(quantize=True, quantize_p=True), dict(mu=0.05, quantize=True)],
                         ids=["plain", "qp", "mu-q"])
@pytest.mark.parametrize("dims,P", _layouts())
def test_iterations_on_every_block_equal_reference(dims, P, opts):
    cfg = PdADMMConfig(**CFG, **opts)
    X, y, Ws, bs = ref.problem(dims, n=12, seed=len(dims) + P)
    out = _run(cfg, dims, P, 4, X, y, Ws, bs)
    S, costs, _ = ref.run(X, y, Ws, bs, ref.hyper(cfg), 4)
    _check_against_reference(cfg, dims, P, out, S, costs)


@pytest.mark.parametrize("opts", [dict(), dict(quantize=True, quantize_p=True), dict(quantize=True)],
                         ids=["plain", "qp", "q"])
@pytest.mark.parametrize("rows", [5, 4096])
def test_row_blocked_iterations_equal_reference(monkeypatch, rows, opts):
    monkeypatch.setattr(mod, "_ROWS", rows)
    dims = [6, 5, 5, 4, 7, 3]
    cfg = PdADMMConfig(**CFG, **opts)
    X, y, Ws, bs = ref.problem(dims, n=23, seed=9)
    out = _run(cfg, dims, 3, 3, X, y, Ws, bs)
    S, costs, _ = ref.run(X, y, Ws, bs, ref.hyper(cfg), 3)
    _check_against_reference(cfg, dims, 3, out, S, costs)


@pytest.mark.parametrize("opts", [dict(), dict(quantize=True)], ids=["plain", "q"])
def test_steps_on_a_restored_state_equal_reference(opts):
    dims = [6, 5, 4, 7, 3]
    cfg = PdADMMConfig(**CFG, **opts)
    X, y, Ws, bs = ref.problem(dims, n=10, seed=3)
    out = _run(cfg, dims, 2, 4, X, y, Ws, bs, restore_at=2)
    S, costs, _ = ref.run(X, y, Ws, bs, ref.hyper(cfg), 4)
    _check_against_reference(cfg, dims, 2, out, S, costs)


# ---- waiting for messages ------------------------------------------------------------------------
class _FakeExchange:
    """test() is False ``n`` times, then True; records the calls."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def test(self):
        self.calls.append("test")
        self.n -= 1
        return self.n < 0

    def wait(self):
        self.calls.append("wait")


def test_wait_polls_and_sleeps_between_tests(monkeypatch):
    sleeps = []
    monkeypatch.setattr(mod.time, "sleep", sleeps.append)
    ex = _FakeExchange(3)
    mod._wait(ex, 250.0)
    assert ex.calls == ["test"] * 4 + ["wait"] and sleeps == [250e-6] * 3
    ex = _FakeExchange(3)
    mod._wait(ex, 0.0)                          # 0: MPI's blocking wait, no polling
    assert ex.calls == ["wait"] and len(sleeps) == 3


def test_wait_poll_us_is_validated():
    with pytest.raises(ValueError, match="wait_poll_us must be >= 0"):
        PdADMMConfig(wait_poll_us=-1.0).validate()
    PdADMMConfig(wait_poll_us=0.0).validate()
