"""Train on NumPy arrays with mpidl.fit: every rank passes the same arrays, mpidl partitions them.

    mpiexec -n 4 python examples/fit_numpy.py            # full size
    mpiexec -n 2 python examples/fit_numpy.py --small    # a few seconds (the test suite runs this)
"""
import sys

import numpy as np

import mpidl


def blobs(n, classes=4, dim=20, seed=0, centres_seed=0):
    """A learnable classification set: Gaussian clouds around fixed random centres (same on every rank)."""
    centres = 2.0 * np.random.default_rng(centres_seed).standard_normal((classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def main():
    small = "--small" in sys.argv
    x, y = blobs(2000 if small else 20000)
    x_test, y_test = blobs(500 if small else 5000, seed=1)
    result = mpidl.fit("mlp", (x, y), (x_test, y_test),
                       algorithm="cdmsgd", topology="ring", hidden=[64],
                       epochs=3 if small else 5, batch_size=32, lr=0.05, momentum=0.9,
                       out="runs", run_name="fit_numpy")
    # every rank gets the same metrics; print them once
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"test accuracy of the average model: {result.metrics['test_acc']:.3f}")
        print(f"results: {result.results_path}")


if __name__ == "__main__":
    main()
