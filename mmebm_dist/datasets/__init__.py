"""Data sets: the builders (PolyMNIST, the street-number pair, birds) on one shared shard writer, the
importers of other layouts (``mmebm data import``) and starter configs from a manifest; `mmebm data`."""
