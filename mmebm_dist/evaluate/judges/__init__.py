"""Judges of generated samples, one per kind of data set: digit classifiers, bird attributes."""
