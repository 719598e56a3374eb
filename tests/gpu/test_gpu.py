"""GPU runs against CPU runs (skipped without a CUDA device).

* 1 rank (in process) and 2 ranks (mpiexec, both ranks on the visible GPU(s)): the final
  parameters after 20 steps on ``run.device = "cuda"`` are within 1e-5 of the CPU run's;
* a checkpoint written by a GPU run resumes on the CPU (``run.device = "cpu"``) and ends
  within 1e-5 of the straight GPU run;
* the sharing / binding log line names the rank, the device and the host;
* the algorithm state lives on the GPU (device-resident), and the staged ([comm] cuda_aware =
  false) and auto-detected communication paths match the CPU at 2 ranks.

Run on a GPU node:  python -m pytest tests/gpu -v
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU tests need torch.cuda.is_available()", allow_module_level=True)

from mpi4py import MPI  # noqa: E402

from mpidl import config as C  # noqa: E402
from mpidl.driver import train  # noqa: E402
from mpidl.h5state import open_read, read_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
TOL = 1e-5
STEPS = 20

# (algorithm, extra settings): the torch families with a device path
ONE_RANK = [("cdmsgd", []), ("centralized", ["algorithm.momentum=0.9"]), ("fedavg", ["algorithm.local_steps=5"]),
            ("lsgd", ["algorithm.tau_G=4"]), ("easgd", ["algorithm.tau=2"]), ("fdg", ["algorithm.stages=1"])]
TWO_RANKS = [("cdsgd", []), ("easgd", ["algorithm.tau=2"]), ("fdg", ["algorithm.stages=2"])]


def _settings(out, name, algo, device, dtype, extra):
    return ["data.dataset=digits", "model.hidden=[32, 16]", "run.batch_size=16", f'run.out="{out}"',
            "run.log_every=10", "run.eval_every=10", "data.eval_samples=100", f"algorithm.name={algo}",
            f"run.steps={STEPS}", "run.checkpoint_every=10", f"run.name={name}", f"run.device={device}",
            f'model.dtype="{dtype}"', "algorithm.lr=0.05"] + list(extra)


def _params(out, name, rank, step=STEPS):
    path = Path(out) / name / "checkpoints" / f"step_{step:08d}" / f"rank_{rank:05d}.h5"
    with open_read(path) as f:
        return read_tree(f["state"])


def _close(a, b, what):
    x, y = np.asarray(a["algo"]["x"], np.float64), np.asarray(b["algo"]["x"], np.float64)
    err = float(np.max(np.abs(x - y)))
    assert err <= TOL, f"{what}: max |x_gpu - x_cpu| = {err:.3e} > {TOL}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("algo,extra", ONE_RANK)
def test_one_rank_gpu_matches_cpu(tmp_path, algo, extra, dtype):
    world = MPI.COMM_WORLD
    gpu = train(C.load(None, _settings(tmp_path, "gpu", algo, "cuda", dtype, extra)), world)
    cpu = train(C.load(None, _settings(tmp_path, "cpu", algo, "cpu", dtype, extra)), world)
    assert gpu["step"] == cpu["step"] == STEPS
    _close(_params(tmp_path, "gpu", 0), _params(tmp_path, "cpu", 0), f"{algo} {dtype}")
    assert abs(gpu["test_acc"] - cpu["test_acc"]) <= 0.02


def _mpiexec_run(n, settings, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_mpi_suite import mpiexec
    args = [a for s in settings for a in ("--set", s)]
    proc = subprocess.run([*mpiexec(), "-n", str(n), sys.executable, "-m", "mpidl", "run", *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("algo,extra", TWO_RANKS)
def test_two_ranks_gpu_matches_cpu(tmp_path, algo, extra):
    gpu = _mpiexec_run(2, _settings(tmp_path, "gpu", algo, "cuda", "float64", extra), tmp_path)
    _mpiexec_run(2, _settings(tmp_path, "cpu", algo, "cpu", "float64", extra), tmp_path)
    for r in range(2):
        _close(_params(tmp_path, "gpu", r), _params(tmp_path, "cpu", r), f"{algo} rank {r}")
    lines = [ln for ln in gpu.stdout.splitlines() if ln.startswith("device: rank ")]
    assert len(lines) == 2 and all("uses cuda:" in ln for ln in lines), gpu.stdout[-2000:]


@pytest.mark.parametrize("algo,extra", [("cdmsgd", []), ("fdg", ["algorithm.stages=1"])])
def test_gpu_checkpoint_resumes_on_the_cpu(tmp_path, algo, extra):
    world = MPI.COMM_WORLD
    train(C.load(None, _settings(tmp_path, "straight", algo, "cuda", "float64", extra)), world)
    first = train(C.load(None, _settings(tmp_path, "moved", algo, "cuda", "float64", extra)), world, max_steps=10)
    assert first["step"] == 10
    assert "torch_cuda" in _params(tmp_path, "moved", 0, 10)["rng"]      # the GPU run saved its CUDA RNG
    second = train(C.load(None, _settings(tmp_path, "moved", algo, "cpu", "float64", extra + ["run.resume=auto"])),
                   world)
    assert second["step"] == STEPS
    _close(_params(tmp_path, "moved", 0), _params(tmp_path, "straight", 0), f"{algo} GPU -> CPU resume")


def test_cpu_checkpoint_resumes_on_the_gpu(tmp_path):
    world = MPI.COMM_WORLD
    train(C.load(None, _settings(tmp_path, "straight", "cdmsgd", "cpu", "float64", [])), world)
    train(C.load(None, _settings(tmp_path, "moved", "cdmsgd", "cpu", "float64", [])), world, max_steps=10)
    train(C.load(None, _settings(tmp_path, "moved", "cdmsgd", "cuda", "float64", ["run.resume=auto"])), world)
    _close(_params(tmp_path, "moved", 0), _params(tmp_path, "straight", 0), "CPU -> GPU resume")


@pytest.mark.parametrize("algo,extra", [("cdmsgd", []), ("lsgd", ["algorithm.momentum=0.5"]),
                                        ("fdg", ["algorithm.stages=1"])])
def test_state_lives_on_the_gpu(algo, extra, tmp_path):
    """Device-resident: the model's flat buffers and every model-sized array of the state are CUDA tensors."""
    from mpidl.layouts import setup_for
    cfg = C.load(None, _settings(tmp_path, "where", algo, "cuda", "float32", extra))
    session = setup_for(cfg)(cfg, MPI.COMM_WORLD, device=torch.device("cuda", torch.cuda.current_device()),
                             cuda_aware=False)
    try:
        arrays = {k: v for k, v in vars(session.state).items() if hasattr(v, "shape") and np.prod(v.shape) > 8}
        assert arrays and all(torch.is_tensor(v) and v.is_cuda for k, v in arrays.items()
                              if k not in ("losses", "slot_hdr_g", "slot_hdr_l", "c_hdr")), \
            {k: (type(v).__name__, getattr(v, "device", "host")) for k, v in arrays.items()}
    finally:
        session.close()


@pytest.mark.parametrize("aware", ["false", "auto"])
def test_two_ranks_staged_and_auto_match_cpu(tmp_path, aware):
    """Staged (cuda_aware = false) and whatever auto picks on this MPI, at 2 ranks, against the CPU."""
    extra = [f"comm.cuda_aware={aware}"]
    _mpiexec_run(2, _settings(tmp_path, "gpu", "cdmsgd", "cuda", "float64", extra), tmp_path)
    _mpiexec_run(2, _settings(tmp_path, "cpu", "cdmsgd", "cpu", "float64", []), tmp_path)
    for r in range(2):
        _close(_params(tmp_path, "gpu", r), _params(tmp_path, "cpu", r), f"cuda_aware={aware} rank {r}")


def test_pinned_prefetched_batches_match_and_overlap(tmp_path, monkeypatch):
    """Issue 30: batches assembled in pinned memory by the reader thread, copied on a side stream
    (the next one during the step): the GPU run with prefetch 3 equals prefetch 0 bitwise, the
    batches are pinned, and copies were issued early."""
    import mpidl.oracles as O
    seen = []
    assemble, close = O.BatchStream.assemble, O.BatchStream.close

    def spy_assemble(self, k):
        xb, yb = assemble(self, k)
        seen.append(xb.is_pinned() and yb.is_pinned())
        return xb, yb

    def spy_close(self):
        seen.append(("early", self.early_copies))
        close(self)
    monkeypatch.setattr(O.BatchStream, "assemble", spy_assemble)
    monkeypatch.setattr(O.BatchStream, "close", spy_close)
    world = MPI.COMM_WORLD
    for name, pf in (("pf0", 0), ("pf3", 3)):
        train(C.load(None, _settings(tmp_path, name, "cdmsgd", "cuda", "float32", [f"data.prefetch={pf}"])), world)
    a, b = _params(tmp_path, "pf0", 0), _params(tmp_path, "pf3", 0)
    assert np.array_equal(np.asarray(a["algo"]["x"]), np.asarray(b["algo"]["x"]))
    assert all(s for s in seen if not isinstance(s, tuple)), "a batch was not pinned"
    early = [s[1] for s in seen if isinstance(s, tuple)]
    assert early[-1] > 0, early
