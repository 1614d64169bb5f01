"""Data set builders (PolyMNIST, the street-number pair, birds) on one shared shard writer; `mmebm data`."""
