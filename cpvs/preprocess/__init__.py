"""Preprocessing: illumination correction, resize, normalization and the chunked store."""
