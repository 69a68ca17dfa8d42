"""Evaluation protocols and the `cpwb evaluate` run (notebooks 03 and 06)."""
