"""Rebuild the shipped Fashion-MNIST quick subset (``data/fashion-mnist-quick/``) from the full set.

    python scripts/make_fashion_subset.py                      # full set from the data root or Debian's package
    python scripts/make_fashion_subset.py --root /path/to/data --out /tmp/quick

Per class, ``--train-per-class`` (500) images of the official train file and ``--test-per-class``
(100) of the t10k file are drawn without replacement by ``numpy.random.default_rng(--seed)`` (0),
class 0 to 9, train before test; each split is then stored in file order. The output folder gets
the four IDX files (gzip without name or timestamp, so the same draw gives the same bytes),
``source-indices.json`` (positions in the official files), the MIT licence of Fashion-MNIST and a
``SHA256SUMS`` manifest that the loader verifies. Same seed and counts, same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LICENSE = """\
Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist), Zalando Research.
The files in this folder are a subset of it, re-encoded unchanged (same pixels, same labels).

The MIT License (MIT) Copyright (c) [2017] Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def draw(labels_by_split: dict[str, np.ndarray], per_class: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Sorted positions of ``per_class[split]`` images of every class in each split, from one generator."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for split in ("train", "test"):
        labels = labels_by_split[split]
        picks = [rng.choice(np.flatnonzero(labels == c), per_class[split], replace=False)
                 for c in range(int(labels.max()) + 1)]
        chosen[split] = np.sort(np.concatenate(picks))
    return chosen


def build_subset(root: Path | None, out: Path, seed: int = 0, train_per_class: int = 500,
                 test_per_class: int = 100) -> Path:
    """Write the subset into ``out`` (created if needed) and return its manifest path."""
    from workbench.data.checksums import write_manifest
    from workbench.data.fashion import FASHION_FILES, FASHION_QUICK_INDICES, fashion_arrays
    from workbench.data.idx import write_idx

    full = {split: fashion_arrays(split, "full", root) for split in ("train", "test")}
    chosen = draw({s: full[s][1] for s in full}, {"train": train_per_class, "test": test_per_class}, seed)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for split, (image_stem, label_stem) in FASHION_FILES.items():
        images, labels, _ = full[split]
        write_idx(out / f"{image_stem}.gz", images[chosen[split]])
        write_idx(out / f"{label_stem}.gz", labels[chosen[split]].astype(np.uint8))
        names += [f"{image_stem}.gz", f"{label_stem}.gz"]
    provenance = {"seed": seed, "per_class": {"train": train_per_class, "test": test_per_class},
                  **{split: chosen[split].tolist() for split in ("train", "test")}}
    (out / FASHION_QUICK_INDICES).write_text(json.dumps(provenance, separators=(",", ":")) + "\n")
    (out / "LICENSE").write_text(LICENSE)
    return write_manifest(out, [*names, FASHION_QUICK_INDICES, "LICENSE"])


def main(argv: list[str] | None = None) -> int:
    from workbench.data.fashion import quick_subset_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="data root holding fashion-mnist/ (default: $WORKBENCH_DATA or data/, then Debian's)")
    parser.add_argument("--out", type=Path, default=quick_subset_dir(), help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        manifest = build_subset(args.root, args.out, args.seed, args.train_per_class, args.test_per_class)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(manifest.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
