"""Rate limits: one Redis Lua script for every scope, batched, with local fallbacks."""
