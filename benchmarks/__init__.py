"""Benchmarks of the amortize objectives (run with ``make bench``; see ``docs/benchmarks.md``)."""
