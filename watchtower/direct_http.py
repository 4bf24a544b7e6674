"""HTTP GET that never goes through a proxy: for scraping our own ranks and supervisor directly.

urllib honours `http_proxy`/`HTTPS_PROXY` from the environment. On a login or compute node with a
proxy set for the outside world, a scrape of `127.0.0.1:9400` (or a compute node's address) would be
sent to the proxy and fail; the supervisor would then see every group as silent and declare hangs.
Our own endpoints (ranks, the supervisor, the Prometheus and Alertmanager that `alerting_stack`
starts on loopback) are always reached directly. Queries to a user's Prometheus keep urllib's default
(the user's proxy settings apply there). Costs nothing: one opener, built once.
"""

from __future__ import annotations

import urllib.request

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_direct(url: str | urllib.request.Request, timeout: float):
    """`urlopen` without any proxy: the response, to be used as a context manager."""
    return _DIRECT.open(url, timeout=timeout)


def get_direct(url: str, timeout: float) -> bytes:
    """The body of `url`, fetched without any proxy; raises OSError/URLError/HTTPError like urlopen."""
    with open_direct(url, timeout) as response:
        return response.read()
