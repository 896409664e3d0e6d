"""The client-facing HTTP layer: connections, error bodies, request ids, client addresses."""
