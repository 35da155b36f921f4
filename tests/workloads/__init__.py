"""Test-only workloads, registered the way any package registers one (an entry point in group
`bitfleet.workloads`); the integration tests' cluster puts their distribution on every process's path."""
