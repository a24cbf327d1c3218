"""Metrics, calibration, subgroups, cross-validation reports and the paper's numbers."""
