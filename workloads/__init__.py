"""bitfleet's built-in workloads, one package per paper family."""
