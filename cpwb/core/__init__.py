"""The core: errors, atomic files, typed settings, provenance, statistics. No torch."""
