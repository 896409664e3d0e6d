"""The hop to the GPU backends: the pooled protocol-level client and forwarding."""
