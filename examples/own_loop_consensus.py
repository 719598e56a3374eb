"""Keep your own training loop; mpidl.optim.Consensus adds the neighbour averaging (CDMSGD).

    mpiexec -n 4 python examples/own_loop_consensus.py
    mpiexec -n 2 python examples/own_loop_consensus.py --small

On a machine with GPUs each rank trains on one (rank i of a node on GPU i mod #GPUs): the model,
the data, the flat buffer and CDMSGD's momentum stay there, and the wrapper stages the mix through
pinned host memory or, with a CUDA-aware MPI, hands the GPU memory to MPI (cuda_aware="auto").
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpidl


def blobs(n, classes=4, dim=20, seed=0, centres_seed=0):
    centres = 2.0 * np.random.default_rng(centres_seed).standard_normal((classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, dim))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def main():
    small = "--small" in sys.argv
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    x, y = blobs(2000 if small else 20000)
    x_test, y_test = blobs(500 if small else 5000, seed=1)
    x, y = x[rank::size], y[rank::size]                  # this rank's shard of the data
    dev = torch.device("cpu")
    if torch.cuda.is_available():                        # one GPU per rank (shared when there are fewer)
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        local = node.Get_rank()                          # this rank's index on its node
        node.Free()
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    x, y, x_test, y_test = x.to(dev), y.to(dev), x_test.to(dev), y_test.to(dev)

    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(dev)
    mpidl.broadcast_parameters(model)                    # every agent starts from rank 0's weights
    opt = mpidl.optim.Consensus(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True),
                                topology="ring", cuda_aware="auto")   # CDMSGD, Nesterov form
    gen = torch.Generator().manual_seed(rank)
    batch = 32
    steps = len(y) // batch                              # the same on every rank here (equal shards)
    steps = MPI.COMM_WORLD.allreduce(steps, op=MPI.MIN)  # every rank must call opt.step equally often
    for epoch in range(2 if small else 5):
        perm = torch.randperm(len(y), generator=gen).to(dev)
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step(loss=loss)
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        accs = MPI.COMM_WORLD.gather(acc)
        if rank == 0:
            print(f"epoch {epoch}: agents' test accuracy {min(accs):.3f}..{max(accs):.3f}")
    sent = MPI.COMM_WORLD.allreduce(opt.bytes_sent())
    opt.close()
    mpidl.average_parameters(model)                      # the consensus average on every rank
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    if rank == 0:
        print(f"average model test accuracy {acc:.3f}; {sent / 1e6:.2f} MB sent by all agents (on {dev.type})")


if __name__ == "__main__":
    main()
