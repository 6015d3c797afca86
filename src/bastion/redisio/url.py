"""Where and how to connect, from the URL forms bastion accepts (redis://, rediss://, redis+unix://)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 6379
_INVALID = "is not a valid URL (check the port and any special characters in the password: percent-encode them)"
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs")
_OPTIONS = ("db", *_TLS_OPTIONS)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A Redis server and the session to open on it. `repr` never shows the password."""

    host: str | None = None  # None: `path` is a Unix socket
    port: int = DEFAULT_PORT
    path: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: ssl.SSLContext | None = field(default=None, repr=False)

    def handshake(self) -> list[tuple[str | int, ...]]:
        """The commands that open a session: AUTH when a password is given, SELECT when a db is."""
        commands: list[tuple[str | int, ...]] = []
        if self.password is not None:
            user = () if self.username is None else (self.username,)
            commands.append(("AUTH", *user, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def parse_url(url: str) -> Endpoint:
    """`redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS; `?ssl_cert_reqs=none|optional|required`,
    `?ssl_ca_certs=PATH`), `redis+unix://[[user]:password@]/path/to/socket[?db=N]`; `?db=N` works for all.
    An `async+` prefix (the `limits` library's spelling) is accepted. Raises ValueError naming what is wrong."""
    url = url.strip().removeprefix("async+")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not echoed: a password with a "/" or "#" in it ends up here
        raise ValueError(_INVALID) from None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if any(name not in _OPTIONS for name in query):  # a typo would be ignored: TLS unverified, or the wrong db
        # The name is not echoed: an unencoded "?" in a password puts the rest of it here.
        raise ValueError(
            f"has a query option bastion does not read (it reads {', '.join(_OPTIONS)}; percent-encode any "
            "special characters in the password)"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    db_text = query.get("db")
    if parts.scheme in ("redis", "redis+unix") and any(name in query for name in _TLS_OPTIONS):
        raise ValueError("ssl_ca_certs and ssl_cert_reqs apply to TLS: write rediss:// (or leave them out)")
    if parts.scheme == "redis+unix":
        if not parts.path:
            raise ValueError("a redis+unix:// URL needs a socket path")
        return Endpoint(path=unquote(parts.path), username=username, password=password, db=_db(db_text))
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("must start with redis://, rediss:// or redis+unix://")
    if not parts.hostname:
        raise ValueError("names no host")
    path_db = parts.path.strip("/")
    tls = _tls_context(query) if parts.scheme == "rediss" else None
    return Endpoint(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        username=username,
        password=password,
        db=_db(db_text if db_text is not None else path_db or None),
        tls=tls,
    )


def _db(text: str | None) -> int:
    if text is None:
        return 0
    if not text.isdigit():  # not echoed, for the same reason as a bad port
        raise ValueError(
            "names a database (the path after the host, or ?db=) that is not a number (check any "
            "special characters in the password: percent-encode them)"
        )
    return int(text)


def _tls_context(query: dict[str, str]) -> ssl.SSLContext:
    cafile = query.get("ssl_ca_certs")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:  # a path is not a secret; the rest of the URL is not echoed
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM file of certificates"
        raise ValueError(f"ssl_ca_certs={cafile}: cannot be read as CA certificates ({reason})") from None
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("none", "optional", "required"):
        raise ValueError("ssl_cert_reqs must be none, optional or required")
    if reqs == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif reqs == "optional":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
