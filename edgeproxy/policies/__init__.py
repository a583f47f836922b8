"""Per-route request policies: the specs and parsers labels use, and the verifiers that enforce them."""
