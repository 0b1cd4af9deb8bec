"""Step 1, data preparation: raw interactions -> k-core -> leave-one-out splits and the item-id map.

``amazon.run(cfg)`` is the entry point (scripts: ``RecBole/prepare_data_2018.py``, ``prepare_data_2014.py``,
``prepare_data.py``); ``amazon.py`` holds the Amazon 2018/2014/2023 readers and the shared pipeline,
``converters.py`` the MovieLens-100K, P5 Beauty and CGR json readers.
"""
