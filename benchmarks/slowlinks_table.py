"""The tables of issue 29 part 3 from the study.json files of ``benchmarks/run_slowlinks.sh``.

    python benchmarks/slowlinks_table.py studies/slowlinks [--copy docs/slowlinks]

Prints, per method, test accuracy (mean ± std over seeds), epochs, steps/s and MB sent in each
setting found under the folder (onenode, unshaped, 1gbit, 100mbit), with the load average of each
setting's runs; ``--copy`` also copies each setting's report.md and study.json (without the
per-seed curves) there.  Every number is read from the study.json files.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np

SETTINGS = (("onenode", "1 node, shared memory"), ("unshaped", "4 nodes, unshaped veth"),
            ("1gbit", "4 nodes, 1 Gbit/s"), ("100mbit", "4 nodes, 100 Mbit/s"))


def _ms(v, fmt):
    v = np.asarray(v, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():{fmt}} ± {sd:{fmt}}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--copy", default="")
    a = ap.parse_args()
    root = Path(a.folder)
    studies = {k: json.loads((root / k / "study.json").read_text()) for k, _ in SETTINGS
               if (root / k / "study.json").exists()}
    labels = dict(SETTINGS)
    print("| setting | link (report.md) | load average during the runs (mean, min-max) |")
    print("|---|---|---|")
    for k, s in studies.items():
        ld = s["load"]
        link = s["machine"][0]["link"] or "none (one node)"
        print(f"| {labels[k]} | {link.split(' (')[0]} | {ld['mean']:.1f} ({ld['min']:.1f}-{ld['max']:.1f}) |")
    print()
    methods = list(next(iter(studies.values()))["methods"])
    for what, fn, fmt in (("test accuracy", lambda r: r["final"]["test_acc"], ".4f"),
                          ("epochs in the budget", lambda r: r["final"]["epoch"], ".2f"),
                          ("steps/s", lambda r: r["final"]["step"] / r["final"]["wall"], ".1f"),
                          ("MB sent (all ranks)", lambda r: r["final"]["bytes_sent"] / 1e6, ".0f")):
        print(f"**{what}** (mean ± std over seeds)\n")
        print("| method | " + " | ".join(labels[k] for k in studies) + " |")
        print("|---|" + "---|" * len(studies))
        for m in methods:
            cells = []
            for s in studies.values():
                runs = [r for r in s["methods"][m]["runs"].values() if r]
                cells.append(_ms([fn(r) for r in runs], fmt) if runs else "-")
            print(f"| {m} | " + " | ".join(cells) + " |")
        print()
    if a.copy:
        for k, s in studies.items():
            dst = Path(a.copy) / k
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / k / "report.md", dst / "report.md")
            slim = json.loads(json.dumps(s))
            for m in slim["methods"].values():
                m.pop("grid", None)
                for r in m["runs"].values():
                    if r:
                        r.pop("curve", None)
            (dst / "study.json").write_text(json.dumps(slim, indent=1, sort_keys=True))
            for png in (root / k).glob("test_acc_vs_*.png"):
                shutil.copy(png, dst / png.name)


if __name__ == "__main__":
    main()
