"""Benchmark harness: scenarios, timing, telemetry, Parquet results, reports."""
