"""Metrics, /stats and /health, dependency state, logging."""
