"""``mpidl run CONFIG.toml [--set section.key=value ...]``: train under mpiexec/srun."""
HELP = "train: mpiexec -n N python -m mpidl run CONFIG.toml [--set algorithm.lr=0.05 ...]"
NEEDS_MPI = True


def add_arguments(p):
    p.add_argument("config", nargs="?", default=None,
                   help="TOML config (sections data, model, topology, algorithm, run); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), repeatable")
    p.add_argument("--resume", default=None, help="shorthand for --set run.resume=VALUE (auto, no, or a step)")


def main(comm, args):
    import logging

    from mpidl import config
    from mpidl.driver import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f'run.resume="{args.resume}"')
    cfg = config.load_collective(comm, args.config, overrides)
    result = train(cfg, comm)
    if comm.Get_rank() == 0:
        logging.getLogger("mpidl").info(
            "finished (%s) at step %d/%d: test acc %.4f (average model), agents %.4f..%.4f, "
            "gap %.4f, %.1f s, results in %s", result["stop"], result["step"], result["steps"],
            result.get("test_acc", float("nan")), result.get("agent_acc_min", float("nan")),
            result.get("agent_acc_max", float("nan")), result.get("generalization_gap", float("nan")),
            result["time"], result["out"])
    return 0
