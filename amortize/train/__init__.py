"""Composer glue: recipe schema, registries, the Composer model, algorithms and the trainer builder.

Import the submodules you need: :mod:`amortize.train.config` (no Composer), :mod:`amortize.train.model`,
:mod:`amortize.train.algorithms`, :mod:`amortize.train.gradcache`, :mod:`amortize.train.optim`, :mod:`amortize.train.builders`
(these import Composer). Importing this package imports nothing heavy.
"""
