"""Composer glue: recipe schema, registries, the Composer model, algorithms, callbacks and the trainer builder.

Import the submodules you need: :mod:`amortize.train.config` and :mod:`amortize.train.builders` (no
Composer until a run or a dry run is built), :mod:`amortize.train.model`, :mod:`amortize.train.algorithms`
(what changes the run), :mod:`amortize.train.callbacks` (what reads or saves it),
:mod:`amortize.train.gradcache` (these import Composer), :mod:`amortize.train.optim`
(Composer when a schedule is built). Importing this package imports nothing heavy.
"""
