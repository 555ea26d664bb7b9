"""Benchmarks run by ``workbench bench <name>``: each module exposes ``main(argv) -> int`` and reports
ratios against a baseline measured in the same run."""
