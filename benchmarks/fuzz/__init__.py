"""Fuzzing mmhub's input boundaries: specs, model folders, uploads. ``python -m benchmarks.fuzz --cases N``."""
