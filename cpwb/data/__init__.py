"""Data: the shipped corpora and the pairs schema. No torch."""
