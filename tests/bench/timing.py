"""Timing helper shared by the benchmarks (the engine's, so recipes time the same way)."""

from engine.stats import median_ms

__all__ = ["median_ms"]
