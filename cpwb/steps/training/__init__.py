"""CP training and its baselines (notebook 02, `cpwb train`)."""
