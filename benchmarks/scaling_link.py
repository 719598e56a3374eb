"""The emulated link alone: one Sendrecv of NBYTES between ranks 0 and 1, after IDLE seconds of
sleep (the link idle, as during a compute), median over 20 after 5 untimed (docs/scaling.md).

    DIR/mpiexec -n 2 python benchmarks/scaling_link.py NBYTES IDLE
"""
import sys
import time

import numpy as np
from mpi4py import MPI

c = MPI.COMM_WORLD
r = c.Get_rank()
n, idle = int(float(sys.argv[1])), float(sys.argv[2])
a = np.ones(n // 4, np.float32)
b = np.empty_like(a)
ts = []
for i in range(25):
    c.Barrier()
    time.sleep(idle)
    t = time.perf_counter()
    c.Sendrecv(a, dest=1 - r, recvbuf=b, source=1 - r)
    ts.append(time.perf_counter() - t)
if r == 0:
    m = float(np.median(ts[5:]))
    print(f"bytes {n} idle {idle}: median {m * 1e3:.2f} ms, {n * 8 / m / 1e6:.0f} Mbit/s")
