"""Whole-plate prediction: tiling, median stitching and the plate runner."""
