"""Storage sinks for the decision log: SQLite (embedded default) and PostgreSQL."""
