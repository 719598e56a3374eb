"""The pure functions of mpidl/algorithms/pdadmm_layout.py without MPI: image pooling, the MLP's
widths and start weights, the per-rank memory estimate and its bound, and the evaluation forward
pass. Fast, for mutation testing (scripts/mutation.sh, target pdadmm-layout-units); every expected
value comes from plain NumPy/torch here, from the state PdADMM actually allocates, or from
tests/reference/pdadmm.py. The session (build, evaluate) is tested under MPI in
tests/mpi/mpitest_pdadmm_driver.py."""
import re
from types import SimpleNamespace as NS

import numpy as np
import pytest

from mpidl.algorithms import pdadmm_layout as M
from mpidl.algorithms.pdadmm import PdADMMConfig
from reference import pdadmm as ref
from test_pdadmm_units import _blocks, _make, _on_ranks


# ---- downsample -----------------------------------------------------------------------------------
@pytest.mark.parametrize("f,shape", [(2, (3, 2, 4, 6)), (3, (2, 1, 6, 9)), (2, (1, 3, 2, 2))])
def test_downsample_averages_f_by_f_blocks(f, shape):
    x = np.random.default_rng(f).normal(size=shape).astype(np.float32)
    n, c, h, w = shape
    want = np.empty((n, c, h // f, w // f))
    for i in range(h // f):
        for j in range(w // f):
            want[:, :, i, j] = x[:, :, i * f:(i + 1) * f, j * f:(j + 1) * f].astype(np.float64).mean(axis=(2, 3))
    got = M.downsample(x, f)
    assert got.shape == (n, c * (h // f) * (w // f)) and got.dtype == np.float64
    np.testing.assert_allclose(got, want.reshape(n, -1), rtol=1e-14, atol=1e-14)


def test_downsample_by_one_only_flattens():
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    got = M.downsample(x, 1)
    assert got.shape == (2, 15) and got.dtype == np.float32 and np.array_equal(got, x.reshape(2, 15))
    assert M.downsample(np.ones((4, 6)), 1).shape == (4, 6)


@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 1, 5, 6), (2, 1, 6, 5), (2, 1, 6, 6, 1)])
def test_downsample_rejects_what_it_cannot_pool(shape):
    with pytest.raises(M.PdADMMError, match=re.escape(f"downsample=2 needs images (N, C, H, W) with H and W "
                                                      f"divisible by 2, got shape {shape}")):
        M.downsample(np.zeros(shape), 2)


# ---- _mlp_dims, _mlp_params ----------------------------------------------------------------------
def _cfg(name="mlp", hidden=(5, 4), loss="ce", init="torch", std=0.1, seed=3):
    return NS(model=NS(name=name, hidden=list(hidden), loss=loss),
              algorithm=NS(init=init, init_std=std), run=NS(seed=seed))


def test_mlp_dims():
    assert M._mlp_dims(_cfg(hidden=(5, 4)), 7, 3) == [7, 5, 4, 3]
    assert M._mlp_dims(_cfg(hidden=(1,)), 2, 2) == [2, 1, 2]
    assert all(type(v) is int for v in M._mlp_dims(_cfg(), np.int64(7), np.int64(3)))
    with pytest.raises(M.PdADMMError, match="pdADMM trains an MLP \\(model.name = \"mlp\"\\), got model 'cnn'"):
        M._mlp_dims(_cfg(name="cnn"), 7, 3)
    for hidden in ((), (5, 0), (0,), (-2,), (5, 2.5), (5, "4")):
        with pytest.raises(M.PdADMMError, match=rf"at least one hidden layer of positive integer width, "
                                                rf"got model.hidden = \[{', '.join(map(repr, hidden))}\]"):
            M._mlp_dims(_cfg(hidden=hidden), 7, 3)
    with pytest.raises(M.PdADMMError, match="model.loss must be \"ce\", got 'mse'"):
        M._mlp_dims(_cfg(loss="mse"), 7, 3)


def test_mlp_params_normal_draws_weights_then_biases():
    dims = [4, 3, 5, 2]
    Ws, bs = M._mlp_params(_cfg(init="normal", std=0.25, seed=11), dims)
    rng = np.random.default_rng(11)
    want_W = [rng.normal(0, 0.25, (dims[l + 1], dims[l])) for l in range(3)]
    want_b = [rng.normal(0, 0.25, dims[l + 1]) for l in range(3)]
    assert len(Ws) == len(bs) == 3
    for got, want in zip(Ws + bs, want_W + want_b):
        assert got.shape == want.shape and np.array_equal(got, want)


# ---- _memory_check -------------------------------------------------------------------------------
def _allocated(dims, P, quantize, dtype, quantize_p=False):
    """Per rank: the bytes of the state arrays and the N x width scratch that PdADMM allocates
    (W, b, z, R, p, q, u, q_in, u_in, the received p or its indices, S), the quantities the estimate
    counts (quantised: q, q_in and, with quantize_p, p as uint16 grid indices)."""
    cfg = PdADMMConfig(quantize=quantize, quantize_p=quantize_p)
    X, y, Ws, bs = ref.problem(dims, n=7, seed=1)

    def rank(r, comm):
        algo = _make(cfg, dims, X, y, r, P, dtype=dtype)
        l0, l1 = _blocks(len(dims) - 1, P)[r]
        st = algo.init(([w.astype(dtype) for w in Ws[l0:l1]], [b.astype(dtype) for b in bs[l0:l1]]), comm)
        arrays = [st.W, st.b, st.z, st.R, st.p, st.q, st.u, st.q_in, st.u_in, algo._S]
        return sum(a.nbytes for a in arrays) + sum(0 if a is None else a.nbytes
                                                   for a in (algo._p_recv, algo._pidx_recv))
    return _on_ranks(P, rank), len(X)


def _sysconf(pages, page=1):
    return lambda name: {"SC_AVPHYS_PAGES": pages, "SC_PAGE_SIZE": page}[name]


@pytest.mark.parametrize("quantize,quantize_p", [(False, False), (True, False), (True, True)],
                         ids=["plain", "q", "qp"])
@pytest.mark.parametrize("dims", [[6, 5, 4, 3], [6, 4, 6, 5, 3], [6, 5, 5, 4, 7, 3]])
def test_memory_estimate_is_the_allocated_state_plus_the_model(monkeypatch, dims, quantize, quantize_p):
    L = len(dims) - 1
    model = 12 * sum(dims[l + 1] * (dims[l] + 1) for l in range(L))     # float32 torch + float64 copy
    for P in range(1, L + 1):
        for dtype in (np.float64, np.float32):
            alloc, n = _allocated(dims, P, quantize, dtype, quantize_p)
            for r, (l0, l1) in enumerate(_blocks(L, P)):
                need = alloc[r] + model
                args = (dims, n, l0, l1, np.dtype(dtype).itemsize, quantize, quantize_p)
                monkeypatch.setattr(M.os, "sysconf", _sysconf(need))
                assert M._memory_check(*args) == need, (dims, P, r, dtype)
                monkeypatch.setattr(M.os, "sysconf", _sysconf(need - 1))
                with pytest.raises(M.PdADMMError, match="GiB"):
                    M._memory_check(*args)


def test_memory_error_names_the_block_and_the_sizes(monkeypatch):
    dims = [6, 5, 4, 7, 3]
    alloc, n = _allocated(dims, 2, False, np.float64)
    itemsize = 2 ** 27                          # elements of 128 MiB: GiB-sized needs from a small problem
    monkeypatch.setattr(M.os, "sysconf", _sysconf(2 ** 18, 2 ** 12))          # 1 GiB available
    for r, (first, widths) in enumerate(((1, [6, 5, 4]), (3, [4, 7, 3]))):
        l0, l1 = _blocks(4, 2)[r]
        need = alloc[r] // 8 * itemsize + 12 * sum(dims[l + 1] * (dims[l] + 1) for l in range(4))
        with pytest.raises(M.PdADMMError) as e:
            M._memory_check(dims, n, l0, l1, itemsize, False)
        assert str(e.value) == (f"layers {first}..{first + 1} with widths {widths} and {n} samples need "
                                f"{need / 2**30:.2f} GiB on this rank but 1.00 GiB are available: use more "
                                "ranks, narrower layers or fewer samples")
        assert 1.5 < need / 2 ** 30 < 100


def test_memory_check_without_sysconf_returns_the_estimate(monkeypatch):
    def no_sysconf(name):
        raise ValueError(name)
    alloc, n = _allocated([6, 5, 4, 3], 1, False, np.float64)
    need = alloc[0] + 12 * (5 * 7 + 4 * 6 + 3 * 5)
    monkeypatch.setattr(M.os, "sysconf", no_sysconf)
    assert M._memory_check([6, 5, 4, 3], n, 0, 3, 8, False) == need
    monkeypatch.setattr(M.os, "sysconf", _sysconf(1))
    with pytest.raises(M.PdADMMError):
        M._memory_check([6, 5, 4, 3], n, 0, 3, 8, False)


# ---- the evaluation forward pass ---------------------------------------------------------------
@pytest.mark.parametrize("rows", [3, 4, 4096])
@pytest.mark.parametrize("last", [True, False])
def test_forward_in_row_blocks(rows, last):
    dims = [6, 5, 4, 3]
    X, _, Ws, bs = ref.problem(dims, n=10, seed=7)
    want = ref.forward(X, Ws, bs)
    if not last:
        want = np.maximum(want, 0)
    out = np.full((10, 3), np.nan)
    got = M._forward(X, list(zip(Ws, bs)), last, out=out, rows=rows)
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)
    got = M._forward(X[:, :5], [(Ws[1], bs[1])], last, out=np.empty((10, 4)), rows=rows)
    want = X[:, :5] @ Ws[1].T + bs[1]
    np.testing.assert_allclose(got, want if last else np.maximum(want, 0), rtol=1e-13, atol=1e-13)
    assert M._forward(X[:0], list(zip(Ws, bs)), last, out=np.empty((0, 3))).shape == (0, 3)


# last: the only test that imports torch (a mutant killed by the tests above never loads it)
def test_mlp_params_torch_is_the_seeded_mlp_in_float64():
    import torch

    from mpidl.models import build_model
    dims = [4, 3, 5, 2]
    Ws, bs = M._mlp_params(_cfg(init="torch", seed=5), dims)
    lins = [m for m in build_model("mlp", (4,), 2, (3, 5), seed=5).modules() if isinstance(m, torch.nn.Linear)]
    assert len(Ws) == len(bs) == len(lins) == 3
    for W, b, lin in zip(Ws, bs, lins):
        assert W.dtype == b.dtype == np.float64
        assert np.array_equal(W, lin.weight.detach().numpy().astype(np.float64))
        assert np.array_equal(b, lin.bias.detach().numpy().astype(np.float64))
