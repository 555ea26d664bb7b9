"""The repository speaks of the software only and cites nothing outside itself.

Benchmarks name a date and a machine; texts and file names carry no words about how the project was
made, and no reference points to a file the repository does not hold.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["README.md", "docs", "workbench", "benchmarks", "notebooks", "tests", "scripts", "data", "Makefile",
           "pyproject.toml", "environment.yml", ".ci"]
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".so", ".pyc", ".pt", ".gz", ".tgz", ".whl"}

# Written so that this file does not match itself: "[b]" and "[.]" match a plain "b" and ".".
MAKING_WORDS = re.compile(r"stop [0-9]+|issue [0-9]+|dev[b]ox", re.IGNORECASE)
OUTSIDE_FILES = re.compile(r"papers[.]md|DESIGN[.]md|/work[/](shared|wt|main)\b|reference[/]papers", re.IGNORECASE)


def _files() -> list[Path]:
    found = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        found += [p for p in candidates if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return found


def _offences(pattern: re.Pattern) -> list[str]:
    hits = []
    for path in _files():
        relative = path.relative_to(ROOT).as_posix()
        if pattern.search(relative):
            hits.append(f"{relative} (file name)")
        if path.suffix in BINARY_SUFFIXES:
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{relative}:{number}: {line.strip()[:100]}")
    return hits


def test_the_scan_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in _files()}
    assert {"README.md", "workbench/cli.py", "benchmarks/README.md", "docs/methods.md"} <= files


@pytest.mark.parametrize(("what", "pattern"), [("words about how the project was made", MAKING_WORDS),
                                               ("references to files outside the repository", OUTSIDE_FILES)])
def test_no_text_or_file_name_matches(what, pattern):
    hits = _offences(pattern)
    assert not hits, f"{what}:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_are_for():
    # the strings are built by concatenation so that this file itself stays clean
    assert MAKING_WORDS.search("taken at Stop" + " 12") and MAKING_WORDS.search("on the dev" + "box")
    assert MAKING_WORDS.search("the target of issue" + " 8")
    assert OUTSIDE_FILES.search("see papers" + ".md 2.4") and OUTSIDE_FILES.search("as in DESIGN" + ".md")
    assert not MAKING_WORDS.search("the sweep stops after 2 points")
