"""Merge ``bench mix --json`` results of several world sizes into one Markdown table.

    python benchmarks/assemble_mix.py benchmarks/results/mix_n2.json benchmarks/results/mix_n4.json \
        [--doc docs/benchmarks.md]

Without ``--doc`` the table is printed.  With it, the text between the lines
``<!-- mix-table:begin -->`` and ``<!-- mix-table:end -->`` of that file is
replaced (the rest of the file is left alone).  No MPI needed.
"""
import argparse
import json
import sys

import numpy as np

from mpidl.commands.bench import fmt_count, format_header, format_table

BEGIN, END = "<!-- mix-table:begin -->", "<!-- mix-table:end -->"


def assemble(paths):
    runs = [json.load(open(p)) for p in paths]
    methods = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
    rows = [row for r in runs for row in r["rows"]]
    parts = []
    for r in runs:
        parts.append(format_header(r["facts"]) + f"; median of {r['repeats']} interleaved repeats, "
                     "each the max over ranks")
    text = "\n".join(f"- {p.replace(chr(10), '; ')}" for p in parts)
    text += "\n\nTimes in ms per call.\n\n" + format_table(rows, methods)
    if "mix" in methods and "floor" in methods:
        ab = np.array([row["median_s"]["mix"] / row["median_s"]["floor"] for row in rows])
        worst = rows[int(np.argmax(ab))]
        text += (f"\n\na/b over all {len(rows)} rows: min {ab.min():.2f}, median {np.median(ab):.2f}, "
                 f"max {ab.max():.2f} (N={worst['N']} {worst['topology']} {worst['dtype']} "
                 f"P={fmt_count(worst['P'])}); rows with a/b <= 1.10: {int((ab <= 1.10).sum())}/{len(rows)}")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--doc", default=None, help="Markdown file with the mix-table markers")
    args = ap.parse_args(argv)
    text = assemble(args.json)
    if not args.doc:
        print(text)
        return 0
    doc = open(args.doc).read()
    if BEGIN not in doc or END not in doc:
        print(text)
        print(f"{args.doc} has no {BEGIN} ... {END} markers; table printed instead", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.doc, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
