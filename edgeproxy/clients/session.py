"""The one outbound aiohttp ClientSession of a process (health probes, JWKS, forward auth,
WebSocket upgrades): no decompression, no invented headers, no cookies."""

from __future__ import annotations

import aiohttp

from edgeproxy.core.settings import Settings

_SKIP_AUTO = frozenset(("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """One ClientSession for the process: no decompression, no invented headers, no cookies."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30,
                                     enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                    sock_read=settings.read_timeout)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_AUTO,
        trust_env=False,
        requote_redirect_url=False,
    )
