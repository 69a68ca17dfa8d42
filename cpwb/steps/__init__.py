"""The steps a researcher runs: hard negatives, training, evaluation."""
