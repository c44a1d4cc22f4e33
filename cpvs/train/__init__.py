"""Training: data from stores, checkpoints, and one trainer per model family."""
