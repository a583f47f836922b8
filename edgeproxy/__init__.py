"""edgeproxy: a Docker-label-driven, auto-discovering edge proxy."""

__version__ = "0.1.0"
