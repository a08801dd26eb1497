"""Spark jobs: thin drivers over importable, testable functions."""
