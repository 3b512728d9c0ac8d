"""Studies of the amortize objectives: small models trained to compare methods (``docs/benchmarks.md``).

Apart from the timing benchmarks of :mod:`benchmarks`: each study trains with the one loop of
:mod:`studies.loop`, builds its losses through the recipe binder, and writes its rows and tables
under ``results/studies/`` (resuming from the ``.runs.jsonl`` files there).
"""
