"""Paste the demo's verdict table into README.md, so the README's numbers are the code's.

    python scripts/update_readme.py [reports/demo/verdict_table.md]

Replaces what stands between ``<!-- demo-verdict:start -->`` and ``<!-- demo-verdict:end -->``, and copies
the demo's middle generation grid and its redshift trends to ``docs/`` (the README shows them).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-verdict:start -->", "<!-- demo-verdict:end -->"


def main(argv: list[str]) -> int:
    table = Path(argv[0] if argv else REPO / "reports" / "demo" / "verdict_table.md")
    if not table.is_file():
        print(
            f"update_readme: error: {table} does not exist (run bash scripts/demo.sh first)", file=sys.stderr
        )
        return 2
    readme = REPO / "README.md"
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1:
        print(f"update_readme: error: {readme} needs one {START} and one {END}", file=sys.stderr)
        return 2
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{table.read_text().strip()}\n{END}{tail}")
    print(f"update_readme: pasted {table} into {readme}")
    grids = sorted(table.parent.glob("generations_z*.png"), key=lambda p: float(p.stem.split("_z")[1]))
    for src, dst in ((grids[len(grids) // 2] if grids else None, "demo-generations.png"),
                     (table.parent / "redshift_trends.png", "demo-redshift-trends.png")):  # fmt: skip
        if src is not None and src.is_file():
            shutil.copyfile(src, REPO / "docs" / dst)
            print(f"update_readme: copied {src} to docs/{dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
