"""``mpidl ckpt DIR``: list, describe and verify checkpoints (no MPI)."""
import json
import os

from mpidl import checkpoint as C
from mpidl.errors import MpidlError

HELP = "list the checkpoints in DIR; --info shows a manifest, --verify checks every file"
NEEDS_MPI = False


def add_arguments(p):
    p.add_argument("dir", help="checkpoint folder (the driver's checkpoint root)")
    p.add_argument("--info", action="store_true", help="print the manifest of one checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step for --info/--verify (default: newest)")
    p.add_argument("--verify", action="store_true",
                   help="check sizes, CRC-32 and readability of every rank file (all checkpoints without --step)")


def _size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def main(comm, args):
    if not os.path.isdir(args.dir):
        raise MpidlError(f"checkpoint folder {args.dir} not found")
    entries = C.list_checkpoints(args.dir)
    done = [e for e in entries if e["complete"]]
    if args.info:
        pick = [e for e in done if args.step is None or e["step"] == args.step]
        if not pick:
            raise MpidlError(f"no complete checkpoint{'' if args.step is None else f' of step {args.step}'} "
                             f"in {args.dir}")
        e = pick[-1]
        print(f"{e['path']} ({_size(e['path']) / 1e6:.2f} MB)")
        print(json.dumps(e["manifest"], indent=2))
        return 0
    if args.verify:
        todo = [e for e in done if args.step is None or e["step"] == args.step]
        if not todo:
            raise MpidlError(f"no complete checkpoint to verify in {args.dir}")
        bad = 0
        for e in todo:
            problems = C.verify_checkpoint(e["path"])
            print(f"step {e['step']}: " + ("ok" if not problems else "DAMAGED"))
            for p in problems:
                print(f"  {p}")
            bad += bool(problems)
        if bad:
            raise MpidlError(f"{bad} of {len(todo)} checkpoint(s) in {args.dir} are damaged")
        return 0
    if not entries:
        print(f"{args.dir}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'state':<10} {'ranks':>5}  {'algorithm':<12} {'size':>10}  created / problem")
    for e in entries:
        m = e["manifest"] or {}
        state = "complete" if e["complete"] else "partial"
        size = f"{_size(e['path']) / 1e6:.2f} MB"
        tail = m.get("created", "") if e["complete"] else e["problem"]
        print(f"{e['step']:>10}  {state:<10} {str(m.get('world_size', '-')):>5}  "
              f"{str(m.get('algorithm') or '-'):<12} {size:>10}  {tail}")
    if done:
        print(f"newest complete: step {done[-1]['step']} (resume with --resume auto)")
    return 0
