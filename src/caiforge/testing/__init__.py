"""Test helpers: a fake inference server for integration tests and benchmarks."""
