"""URLs fleet is given (a vCenter's SDK endpoint): checked whole at load time, and redacted
wherever one is shown.

:func:`url_problem` is the one check for every URL fleet accepts: http or https, a
host that parses (``[::1`` does not), a numeric port in 1..65535, no whitespace or
control characters, no query or fragment (fleet appends ``/sdk`` paths), and no
user info. ``https://user:SECRET@vc/sdk`` is refused rather than used: the
password would ride along in every log line and message that shows the URL, and
secrets come from ``*_env`` or ``*_file`` keys only.

:func:`redact_url` is the one way a URL reaches a log line, message or the
terminal: anything before an ``@`` in it is replaced by ``***``. It never fails,
whatever the string, so even a URL that :func:`url_problem` refuses is shown
safely in the message that refuses it. See docs/limits.md.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//")
_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def host_port(host: str, port: int) -> str:
    """``HOST:PORT`` as a URL writes it: an IPv6 address in brackets (``[::1]:443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact_url(url: str) -> str:
    """``url`` with any user info (everything up to its last ``@``) shown as ``***``."""
    if "@" not in url:
        return url
    m = _SCHEME.match(url)
    prefix = m.group() if m else ""
    # Up to the LAST "@": a password may itself hold "@", "/" or "?" unescaped.
    return prefix + "***@" + url.rpartition("@")[2]


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL fleet can use, as a phrase to follow the
    (redacted) URL in a message ("... has no host"), or None."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "is not an http(s) URL: it contains whitespace or control characters"
    if "@" in url:
        return ("has a user name or password in it; give the user in vcenter.user and the "
                "password through vcenter.password_env or vcenter.password_file")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # urllib's own text quotes the part it could not read; say it without the URL.
        return "is not an http(s) URL: " + (
            "its port is not a number from 1 to 65535" if "port" in str(exc).lower()
            else "its host is not an IPv6 address in brackets" if "IPv6" in str(exc)
            else "it cannot be parsed")
    # The scheme as written, not as urllib lowercases it: "HTTPS://" would pass here
    # and then be taken for plain http wherever the text is compared.
    if url.split("://", 1)[0] not in ("http", "https") or not parts.netloc:
        return 'is not an http(s) URL like "https://vcenter.example.com/sdk"'
    if port == 0:
        return "is not an http(s) URL: its port is not a number from 1 to 65535"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "has a query or fragment; give the SDK endpoint only"
    host = parts.hostname or ""
    if not host:
        return "is not an http(s) URL: it has no host"
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "is not an http(s) URL: its host is not an IPv6 address in brackets"
    elif not _DNS_NAME.fullmatch(host):
        return "is not an http(s) URL: its host is neither a host name nor an IP address"
    return None
