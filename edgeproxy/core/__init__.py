"""Shared foundations, no aiohttp/redis/docker: settings, logs, paths, headers, hosts, certificates."""
