"""Providers: where observations come from (Docker, the routes file)."""
