"""The LM engine: assets, per-sequence NLL, losses, generation, scorers, devices and adapters."""
