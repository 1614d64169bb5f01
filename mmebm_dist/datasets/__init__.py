"""Data sets: importers of other layouts (``mmebm data import``) and starter configs from a manifest."""
