"""Command line: ``python -m mpidl {run,compare,shard,topo,bench,ckpt,report} ...``.

Each command lives in ``mpidl/commands/<name>.py`` and defines ``HELP``,
``NEEDS_MPI``, ``add_arguments(parser)`` and ``main(comm, args) -> int``
(``comm`` is ``MPI.COMM_WORLD`` or None when the command needs no MPI).

Errors: an :class:`~mpidl.errors.MpidlError` is printed once (rank 0), with no
traceback, and every rank exits with status 2.  Before any command that needs
MPI runs, :func:`mpidl.comm.init_world` refuses N singleton worlds started by
an N-task launcher (srun without a PMI plugin, another MPI's mpiexec); then
only the launcher's task 0 prints the one-line error.  Any other exception prints its
traceback with a ``[rank N]`` prefix and aborts the whole MPI job, so one
failing rank never leaves the others hanging until walltime.
"""
import argparse
import importlib
import sys
import traceback

from mpidl import __version__
from mpidl.errors import MpidlError

COMMANDS = {
    "run": "mpidl.commands.run",
    "compare": "mpidl.commands.compare",
    "shard": "mpidl.commands.shard",
    "topo": "mpidl.commands.topo",
    "bench": "mpidl.commands.bench",
    "ckpt": "mpidl.commands.ckpt",
    "report": "mpidl.commands.report",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mpidl", description="Parallel and decentralized training over MPI.")
    parser.add_argument("--version", action="version", version=f"mpidl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = {}
    for name, path in COMMANDS.items():
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name != path:
                raise
            continue
        modules[name] = mod
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    return parser, modules


def main(argv=None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    mod = modules[args.command]
    comm = None
    rank = 0
    if getattr(mod, "PREEMPTIBLE", False):  # a SIGTERM/SIGUSR1 during start-up becomes a stop request
        from mpidl.checkpoint import catch_early_signals
        catch_early_signals()
    if mod.NEEDS_MPI:
        from mpidl.comm import LaunchError, init_world
        try:
            comm = init_world()
        except LaunchError as e:  # N singleton worlds of an N-task launch: one line, exit 2
            if e.launcher_rank in (0, None):
                print(f"mpidl {args.command}: error: {e}", file=sys.stderr, flush=True)
            return 2
        rank = comm.Get_rank()
    from mpidl import log
    log.setup(rank)
    try:
        status = int(mod.main(comm, args) or 0)
        if getattr(mod, "PREEMPTIBLE", False):  # done: a late stop request must not kill the teardown
            import signal
            for s in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(s, signal.SIG_IGN)
        return status
    except MpidlError as e:
        if rank == 0:
            print(f"mpidl {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except BaseException:
        if comm is not None and comm.Get_size() > 1:
            lines = traceback.format_exc().rstrip().splitlines()
            sys.stderr.write("".join(f"[rank {rank:03d}] {ln}\n" for ln in lines))
            sys.stderr.flush()
            comm.Abort(1)
        raise


if __name__ == "__main__":
    sys.exit(main())
