"""Per-route request policies applied after matching: JWT authentication and rate limits."""
