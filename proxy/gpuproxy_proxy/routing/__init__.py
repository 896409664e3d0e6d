"""Backends, their health and the load-balancing strategies that pick one."""
