"""Fixtures for the autoscaling tests: real proxy processes on loopback addresses (see
proxies.py) for the integration test; the policy tests need none."""
