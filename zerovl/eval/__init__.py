"""Scorers: pure functions from predictions and references to metrics, one module per task."""
