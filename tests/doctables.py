"""Read the defaults documented in the docs' markdown option tables (| key | default | meaning |)."""
import re
import tomllib
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


def _value(text):
    """A table cell as a value: TOML when it parses, else the bare word (``torch`` -> "torch")."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", text):
            raise ValueError(f"cannot read the documented default {text!r}") from None
        return text


def doc_defaults(doc, heading):
    """{key: default} from the markdown table under ``heading`` in ``docs/<doc>``.

    A "a, b" / "a / b" key cell with values "x, y" holds two keys; " (...)"
    remarks in the value cell are dropped.  A row with more keys than values (``lr``, ...,
    "0.01, constant") pairs the first ones; one value for several keys is each key's.
    """
    text = (DOCS / doc).read_text()
    if heading not in text:
        raise ValueError(f"docs/{doc} has no heading {heading!r}")
    lines = text.split(heading, 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = lines[first + 2:first + 60]
    rows = rows[:next((i for i, line in enumerate(rows) if not line.startswith("|")), len(rows))]
    out = {}
    for row in rows:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        keys = [k.strip("`") for k in re.split(r"\s*[,/]\s*", cells[0])]
        cell = re.sub(r"\s*\([^)]*\)", "", cells[1])      # remarks: "-1 (= lam, lam_G)"
        vals = re.split(r"\s*/\s*|,\s(?![^\[]*\])", cell)
        for k, v in zip(keys, vals if len(vals) > 1 else [cell] * len(keys)):
            out[k] = _value(v.strip().strip("`"))
    return out
