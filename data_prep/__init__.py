"""From a raw dataset download to a training cache: one module per dataset (``python -m data_prep.<dataset>``).

Shared parts: :mod:`data_prep.media` (decoding), :mod:`data_prep.audio` (spectrogram recipes),
:mod:`data_prep.cache` (the writer of the format in :mod:`onthefly.data.cache`) and :mod:`data_prep.pipeline`
(arguments, process pool, summary). Run the modules from the repository root (the Makefile's prep targets do).
"""

from data_prep.parent import watch_if_spawned

watch_if_spawned()  # a spawned prep worker exits with the prep (before this package's heavy imports)
