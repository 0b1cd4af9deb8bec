"""Step 1, data preparation: raw interactions -> k-core -> leave-one-out splits and the item-id map.

``prepare.run(cfg)`` is the entry point (scripts: ``RecBole/prepare_data_2018.py``, ``prepare_data_2014.py``,
``prepare_data.py``). Modules by concern: ``reading.py`` (rows, line reading, bad-line reports, the
``RawFormat`` reader interface), ``amazon.py`` (the Amazon 2018/2014/2023 layouts), ``converters.py``
(MovieLens-100K, P5 Beauty, CGR json), ``formats.py`` (the ``raw_format`` registry and input-file lookup),
``prepare.py`` (de-duplication, k-core, leave-one-out, writing).
"""
