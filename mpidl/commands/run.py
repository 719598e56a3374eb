"""``mpidl run CONFIG.toml [--set section.key=value ...]``: train under mpiexec/srun."""
HELP = "train: mpiexec -n N python -m mpidl run CONFIG.toml [--set algorithm.lr=0.05 ...]"
NEEDS_MPI = True
PREEMPTIBLE = True  # SIGTERM/SIGUSR1 from start-up on: save at a step boundary and exit 0


def add_arguments(p):
    p.add_argument("config", nargs="?", default=None,
                   help="TOML config (sections data, model, topology, algorithm, run); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), repeatable")
    p.add_argument("--resume", default=None, help="shorthand for --set run.resume=VALUE (auto, no, or a step)")


def main(comm, args):
    import logging

    from mpidl import config
    from mpidl.driver import headline, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f'run.resume="{args.resume}"')
    cfg = config.load_collective(comm, args.config, overrides)
    result = train(cfg, comm)
    if comm.Get_rank() == 0:
        lg = logging.getLogger("mpidl")
        head = f"finished ({result['stop']}) at step {result['step']}/{result['steps']}"
        if result.get("evaluated"):
            more = f", {result['summary']}" if result.get("summary") else ""
            lg.info("%s: %s%s, %.1f s, results in %s", head, headline(result), more,
                    result["time"], result["out"])
        else:
            lg.info("%s: no evaluation in this invocation (see %s/results.h5 for earlier ones), %.1f s",
                    head, result["out"], result["time"])
    return 0
