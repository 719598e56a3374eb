"""``mpidl compare STUDY.toml``: several methods on one problem, one budget, several seeds, one report."""
HELP = ("compare methods at an equal budget over seeds: mpiexec -n N python -m mpidl compare STUDY.toml "
        "(docs/compare.md)")
NEEDS_MPI = True
PREEMPTIBLE = True  # SIGTERM/SIGUSR1: the running run saves a checkpoint; rerun the command to continue


def add_arguments(p):
    p.add_argument("study", help="study TOML: [data] [model] [topology] [run], [[method]] tables, seeds, "
                                 "and one budget (epochs, wall_seconds or bytes)")
    p.add_argument("--out", default=None, help="output folder (default: the study's out, else studies/<stem>)")
    p.add_argument("--report-only", action="store_true",
                   help="write report.md, study.json and the plots from the runs on disk; start no run")
    p.add_argument("--verbose", action="store_true", help="also show each run's progress and evaluation lines")


def main(comm, args):
    from mpidl.study import compare

    compare(args.study, comm, out=args.out, report_only=args.report_only, verbose=args.verbose)
    return 0
