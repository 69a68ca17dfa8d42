"""The application: the `cpwb` command, the notebook runner, sweeps, widgets and benchmarks."""
