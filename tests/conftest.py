"""Suite-wide pytest setup: only registers shared plugins; area conftests live in subfolders."""

# Real Redis/PostgreSQL/PgBouncer fixtures: redis_server, postgres_server, pgbouncer_server.
pytest_plugins = ["tests.services"]
