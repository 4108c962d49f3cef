"""Benchmarks run on demand, never as timed tests: `python -m tests.bench.run --help`.

`image` builds the seeded ext4 disk images (also used by the demo and the end-to-end tests),
`peers` runs restic and borg, `coffer` runs a private Coffer install, `run` compares them.
"""
