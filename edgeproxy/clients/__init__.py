"""How the proxy talks out: the HTTP/1.1 and HTTP/2 pools to replicas and the one outbound aiohttp session."""
