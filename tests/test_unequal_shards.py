"""Unequal shards (by-class and Dirichlet partitions): what an epoch means.

The expected numbers are written out by hand or recomputed here from the documented rule
(docs/data.md, "Unequal shards"), not taken from the production functions:

* every rank runs the same steps per epoch, ``spe = min_i n_i // batch`` (full batch: one step of
  ``min_i n_i`` samples), and too large a batch is one error on every rank;
* within an epoch no rank draws a row twice: epoch e's rows are the first ``spe * batch`` entries
  of ``default_rng([seed, rank, e]).permutation(n_rank)``;
* the ``n_rank - spe * batch`` rows a larger shard does not reach in epoch e are not carried over:
  epoch e + 1 draws a fresh permutation, so every row is drawn with the same frequency
  ``spe * batch / n_rank`` per epoch in the long run, and a convex full-batch oracle uses its
  whole shard at every step.
"""
import numpy as np
import pytest

from mpidl.data import partition
from mpidl.errors import MpidlError
from mpidl.layouts import steps_per_epoch
from mpidl.oracles import ConvexOracle, batch_indices

# class sizes 30, 50, 20, 40, labels interleaved so no scheme can lean on the file order
COUNTS = (30, 50, 20, 40)
Y = np.random.default_rng(7).permutation(np.repeat(np.arange(4), COUNTS))


class MinComm:
    """A control communicator stand-in: every rank contributes its local count to the min."""

    def __init__(self, sizes):
        self.sizes = list(sizes)

    def allreduce(self, x, op="sum"):
        assert op == "min"
        return min(self.sizes)


def _epoch_rows(n, batch, spe, seed, rank, e):
    """The documented rule, recomputed here: epoch e's rows in draw order."""
    return np.random.default_rng([seed, rank, e]).permutation(n)[:spe * batch]


@pytest.mark.parametrize("agents,sizes", [(2, [80, 60]), (4, [30, 50, 20, 40]), (3, [80, 20, 40])])
def test_by_class_sizes(agents, sizes):
    parts = partition(Y, agents, "by-class", seed=0)
    assert [len(p) for p in parts] == sizes                 # whole classes: 30+50 | 20+40, ...
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(Y)))


@pytest.mark.parametrize("sizes,batch,want", [
    ([80, 60], 16, (16, 3)),             # 60 // 16
    ([30, 50, 20, 40], 8, (8, 2)),       # 20 // 8
    ([30, 50, 20, 40], 20, (20, 1)),
    ([30, 50, 20, 40], 0, (20, 1)),      # full batch = the smallest shard
    ([7, 1000], 7, (7, 1)),
])
def test_every_rank_agrees_on_steps_per_epoch(sizes, batch, want):
    got = {steps_per_epoch(MinComm(sizes), n, batch) for n in sizes}
    assert got == {want}


def test_batch_larger_than_smallest_shard_is_one_error_on_every_rank():
    sizes = [30, 50, 20, 40]
    for n in sizes:                              # the same error whatever the local size
        with pytest.raises(MpidlError, match="smallest shard has 20 samples, fewer than batch_size 21"):
            steps_per_epoch(MinComm(sizes), n, 21)


@pytest.mark.parametrize("scheme", ["by-class", "dirichlet"])
def test_no_rank_draws_a_row_twice_within_an_epoch(scheme):
    parts = partition(Y, 4, scheme, seed=3, alpha=0.3)
    sizes = [len(p) for p in parts]
    assert len(set(sizes)) > 1                    # the case under test: unequal shards
    batch = 4
    spe = min(sizes) // batch
    for rank, n in enumerate(sizes):
        for e in range(3):
            drawn = np.concatenate([batch_indices(n, batch, spe, 5, rank, e * spe + j) for j in range(spe)])
            assert len(drawn) == spe * batch and len(np.unique(drawn)) == len(drawn)
            assert drawn.min() >= 0 and drawn.max() < n
            assert np.array_equal(drawn, _epoch_rows(n, batch, spe, 5, rank, e))


def test_rows_a_larger_shard_does_not_reach_are_redrawn_next_epoch():
    n, batch, spe, rank = 50, 8, 2, 1                # a 50-row shard beside a 16..23-row smallest one
    used = spe * batch
    epochs = 600
    counts = np.zeros(n, dtype=np.int64)
    skipped = []
    for e in range(epochs):
        drawn = np.concatenate([batch_indices(n, batch, spe, 0, rank, e * spe + j) for j in range(spe)])
        counts[drawn] += 1
        skipped.append(frozenset(range(n)) - frozenset(drawn.tolist()))
        assert len(skipped[-1]) == n - used          # exactly n - spe * batch rows wait this epoch
    assert len(set(skipped)) > epochs // 2          # not the same rows every epoch (no carry-over)
    p = used / n                                    # each row: Binomial(epochs, used / n)
    sd = np.sqrt(epochs * p * (1 - p))
    assert np.all(np.abs(counts - epochs * p) < 5 * sd), counts
    first = [next(e for e in range(epochs) if r not in skipped[e]) for r in range(n)]
    assert max(first) < 40                          # every row is reached within a few epochs


def test_torch_and_convex_oracles_follow_the_rule():
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    cvx = ConvexOracle(x, y, "logistic", batch_size=8, steps_per_epoch=2, seed=4, rank=2)
    for k in range(6):
        e, j = divmod(k, 2)
        assert np.array_equal(cvx.indices(k), _epoch_rows(50, 8, 2, 4, 2, e)[j * 8:(j + 1) * 8])
    full = ConvexOracle(x, y, "logistic", batch_size=0, steps_per_epoch=1, seed=4, rank=2)
    assert full.indices(0) is None                   # convex full batch: the whole shard every step
    torch = pytest.importorskip("torch")
    from mpidl.flat import FlatModel
    from mpidl.oracles import TorchOracle
    fm = FlatModel(torch.nn.Linear(3, 2), torch.float32)
    to = TorchOracle(fm, x, y, batch_size=8, steps_per_epoch=2, seed=4, rank=2, num_classes=2)
    for k in range(6):
        e, j = divmod(k, 2)
        assert np.array_equal(to.indices(k), _epoch_rows(50, 8, 2, 4, 2, e)[j * 8:(j + 1) * 8])
