"""``mmebm data import FORMAT SRC --out DIR``: data in other layouts to the shards + manifest of the builders.

One module per format (``polymnist_folders``, ``mnist_svhn``, ``cub_captions``, ``table``, ``webdataset``),
the shared reading, checking and atomic writing in :mod:`.common`, the command line in :mod:`.cli`.
"""
