"""Usage records: token usage parsed from responses, batched into PostgreSQL."""
