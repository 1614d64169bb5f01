"""Evaluation of trained runs: coherence read by judges, sample grids, objective terms, reports, results."""
