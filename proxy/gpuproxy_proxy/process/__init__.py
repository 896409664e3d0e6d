"""Processes: the worker, the supervisor, heartbeats, the SIGTERM drain, GC control."""
