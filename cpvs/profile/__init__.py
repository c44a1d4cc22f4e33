"""Profiling: segmentation, CellProfiler features (cp_measure), aggregation, normalization, selection."""
