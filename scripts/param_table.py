"""Parameter counts of ResNet-164 on CIFAR-100 (plain, +SE, +IEBN, +DIA) next to the papers' counts
(counted from the papers' official model definitions, see docs/methods.md, *References*).

    python scripts/param_table.py                  # print the markdown table
    python scripts/param_table.py --write README.md  # replace the block between the markers

The README block sits between ``<!-- param-table:start -->`` and ``<!-- param-table:end -->``;
tests/test_models_cifar.py checks that it matches what this script generates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START, END = "<!-- param-table:start -->", "<!-- param-table:end -->"
# (label, norm, attention, count reported by the papers or None, source)
VARIANTS = (
    ("ResNet-164", "bn", "none", 1_727_284, "IEBN and DIANet code"),
    ("ResNet-164 + SE", "bn", "se", None, "not in these papers"),
    ("ResNet-164 + IEBN", "iebn", "none", 1_751_508, "IEBN code"),
    ("ResNet-164 + DIA", "bn", "dia", 1_946_132, "DIANet code"),
)


def param_counts(num_classes: int = 100) -> list[dict]:
    from workbench.models import build_model

    rows = []
    for label, norm, attention, paper, source in VARIANTS:
        model = build_model("resnet164", num_classes=num_classes, norm=norm, attention=attention)
        ours = sum(p.numel() for p in model.parameters())
        rows.append({"label": label, "norm": norm, "attention": attention, "ours": ours, "paper": paper,
                     "source": source})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model (CIFAR-100, 100 classes) | parameters (ours) | parameters (papers) | difference |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        if r["paper"] is None:
            paper, diff = f"n/a ({r['source']})", "-"
        else:
            delta = r["ours"] - r["paper"]
            paper, diff = f"{r['paper']:,} ({r['source']})", f"{delta:+,} ({delta / r['paper']:+.2%})"
        lines.append(f"| {r['label']} | {r['ours']:,} | {paper} | {diff} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the content between the markers replaced by ``table``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected exactly one {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def readme_block(text: str) -> str | None:
    """The table between the markers, or None when the markers are absent."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="README", help="replace the marked block in this markdown file")
    args = parser.parse_args(argv)
    table = markdown_table(param_counts())
    print(table, end="")
    if args.write:
        path = Path(args.write)
        new = replace_block(path.read_text(), table)
        from workbench.io import write_text_atomic

        write_text_atomic(path, new)
        print(f"wrote the table into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
