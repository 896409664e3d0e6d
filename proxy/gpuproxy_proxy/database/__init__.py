"""The PostgreSQL (through PgBouncer) connection pool and schema migrations."""
