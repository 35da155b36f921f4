"""bitfleet: YAML workload specs run as fault-tolerant Ray Train jobs, sweeps and pipelines."""

__version__ = "0.1.0"
