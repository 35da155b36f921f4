"""From a validated spec to Ray work: one run, a job submission."""
