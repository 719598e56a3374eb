"""``mpidl report RESULTS.h5 [...]``: summary table and PNG plots of results files (no MPI)."""
from mpidl.metrics import report

HELP = "summary table and PNG plots (loss/accuracy vs step, time, bytes) of results files"
NEEDS_MPI = False


def add_arguments(p):
    p.add_argument("paths", nargs="+", metavar="RESULTS", help="results HDF5 files written by `mpidl run`")
    p.add_argument("--out", default="report", help="folder for the PNGs and summary.txt (default: report)")


def main(comm, args):
    out = report(args.paths, args.out)
    print(f"wrote {len(out['plots'])} plot(s) and {out['summary']} into {args.out}/")
    return 0
