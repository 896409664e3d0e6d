"""A simulated vLLM-like inference server: OpenAI API, vLLM metrics, a batching KV-cache engine.

For tests and routing benchmarks without GPUs; it replaces nothing real.
"""
