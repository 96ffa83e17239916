"""What a Redis URL says: its scheme checked, its secrets found and hidden, and Sentinel's.

Redis under Sentinel: ``redis+sentinel://[user:pass@]h1:26379,h2:26379/<service>[/db]``.
Clients ask the sentinels which server is the primary of ``service`` each time they connect, so
after a failover every reconnect finds the promoted replica (redis-py's Sentinel support; a
connection still open to a demoted primary is dropped on its first READONLY reply). The URL's
credentials are the primary's; sentinels that want their own take ``sentinel_username`` and
``sentinel_password`` from the query. ``rediss+sentinel://`` speaks TLS to the sentinels and to
the primary, with the ``ssl_*`` query options of a ``rediss://`` URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from sage_mq.errors import ConfigError

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""The Sentinel schemes, and whether each speaks TLS."""
DEFAULT_SENTINEL_PORT = 26379
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelUrl:
    """What a Sentinel URL says (parsed by :func:`parse_sentinel_url`)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)
    sentinel_auth: dict[str, str] = field(default_factory=dict)

    def primary_kwargs(self) -> dict[str, Any]:
        """Connection options for the primary's connections (redis-py's ``master_for``)."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username}
        kwargs["password"] = self.password
        if self.tls:
            kwargs |= {"ssl": True, **self.tls_options}
        return kwargs

    def sentinel_kwargs(self, socket_timeout_s: float) -> dict[str, Any]:
        """Connection options for the sentinels themselves."""
        kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": socket_timeout_s,
        }
        kwargs |= {k.removeprefix("sentinel_"): v for k, v in self.sentinel_auth.items()}
        if self.tls:
            kwargs |= {"ssl": True, **self.tls_options}
        return kwargs


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a Sentinel URL; :class:`ConfigError`, in one line without the password,
    for one that is malformed."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    shown = redact_url(url)
    sentinels = tuple(_host_port(h, shown) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ConfigError(f"bad Redis URL {shown!r}: name at least one sentinel (host:port)")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            f"bad Redis URL {shown!r}: after the sentinels comes /<service>[/<db>], the name "
            "the sentinels monitor (`sentinel monitor <service> ...`) and a database number"
        )
    query = dict(parse_qsl(parts.query))
    unknown = sorted(set(query) - {*_TLS_OPTIONS, *_SENTINEL_AUTH})
    if unknown:
        known = ", ".join((*_TLS_OPTIONS, *_SENTINEL_AUTH))
        raise ConfigError(f"bad Redis URL {shown!r}: unknown option {unknown[0]!r} ({known})")
    username, _, password = userinfo.partition(":")
    return SentinelUrl(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        tls=SCHEMES[parts.scheme.lower()],
        tls_options={k: v for k, v in query.items() if k in _TLS_OPTIONS},
        sentinel_auth={k: v for k, v in query.items() if k in _SENTINEL_AUTH},
    )


def _host_port(text: str, shown: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"bad Redis URL {shown!r}: {text!r} is not host:port")
    return host.strip("[]"), int(port)


def check_redis_url(url: str) -> None:
    """:class:`ConfigError` for a URL no Redis client takes (what ``connect`` would say)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix", *SCHEMES):
        raise ConfigError(
            f"bad Redis URL {redact_url(url)!r}: it must begin with redis://, rediss:// (TLS), "
            "unix://, or redis+sentinel:// (rediss+sentinel://) naming the sentinels"
        )
    if is_sentinel_url(url):
        parse_sentinel_url(url)


_QUERY_SECRET = re.compile(r"((?:^|[?&])(?:sentinel_)?password=)[^&#]*")
_HIDDEN = r"\1***"


def redact_url(url: str) -> str:
    """The URL with any password (the user's, and a ``password``/``sentinel_password`` in its
    query) replaced by ``***``, safe for logs and messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    return f"{scheme}{sep}{netloc}{_QUERY_SECRET.sub(_HIDDEN, tail)}"


def url_secrets(url: str) -> list[str]:
    """What in a Redis URL opens Redis: its passwords, and the URL itself when it has one."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return [url]
    found = [password] if password else []
    found += [v for k, v in parse_qsl(parts.query) if k in ("password", "sentinel_password") and v]
    if not found:
        return []
    return list(dict.fromkeys([*(unquote(s) for s in found), *found, url]))  # as sent, as typed
