"""Hard negatives by adversarial paraphrasing (notebook 01, `cpwb generate`)."""
