"""Composer glue: recipe schema, registries, the Composer model, algorithms and the trainer builder.

Import the submodules you need: :mod:`amortize.train.config` and :mod:`amortize.train.builders` (no
Composer until a run or a dry run is built), :mod:`amortize.train.model`, :mod:`amortize.train.algorithms`,
:mod:`amortize.train.gradcache`, :mod:`amortize.train.guards` (these import Composer), :mod:`amortize.train.optim`
(Composer when a schedule is built). Importing this package imports nothing heavy.
"""
