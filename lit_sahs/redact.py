"""Secrets out of every message about a URL: the one function (`redact`) that errors, logs, MLflow
params, tags and reports pass a database or tracking URL (or a message quoting one) through.

What is hidden, for each URL:

* the password of ``scheme://user:password@host``. Users paste passwords unencoded, so it runs to
  the *last* ``@`` of the URL (an ``@``, ``:`` or ``/`` inside it is hidden too; a host part after
  an ``@`` in a query value is hidden with it, which costs a little context and leaks nothing);
* the value of every query parameter whose name says it is secret (``?password=``, ``sslpassword``,
  ``token``, ``api_key``, ``secret``…), to the end of the URL, since an unencoded ``&`` may be part of it;
* any piece, four characters or longer, of those secrets elsewhere in the message: database drivers
  quote fragments of a URL they fail to parse (``invalid literal for int() with base 10: 'Secret99'``).
"""
from __future__ import annotations

import re
from typing import Optional

MASK = "***"
MIN_FRAGMENT = 4  # a shorter piece of a secret says next to nothing about it
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*://")
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|cred|sig", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"[?&;]([^=&;?#]*)=")


def _split(url: str) -> tuple[str, list[tuple[int, int]]]:
    """(the URL with its secrets masked, the [start, end) spans of those secrets in `url`). Both readings
    of an ambiguous URL are masked: an '@' in a query value could end a password, and a '?' or '&' in a
    password could start a query."""
    m = _SCHEME.match(url)
    if not m:
        return url, []
    spans: list[tuple[int, int]] = []
    start = m.end()
    at = url.rfind("@")
    if at > start:
        colon = url.find(":", start, at)
        if colon != -1 and at > colon + 1:
            spans.append((colon + 1, at))
    for q in _QUERY_PARAM.finditer(url, start):
        if _SECRET_KEY.search(q.group(1)) and q.end() < len(url):
            spans.append((q.end(), len(url)))
            break
    masked = [False] * len(url)
    for a, b in spans:
        masked[a:b] = [True] * (b - a)
    out, i = [], 0
    while i < len(url):
        if masked[i]:
            while i < len(url) and masked[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(url[i])
            i += 1
    return "".join(out), spans


def secrets(url: str) -> list[str]:
    """The secret parts of `url` (password, secret query values), as they are written in it."""
    _, spans = _split(str(url))
    return [str(url)[a:b] for a, b in spans]


def _mask_fragments(text: str, secret_list: list[str]) -> str:
    pieces = set()
    for s in secret_list:  # a shorter secret is masked where the URL shows it, not in every word
        for i in range(len(s) - MIN_FRAGMENT + 1):
            for j in range(i + MIN_FRAGMENT, len(s) + 1):
                pieces.add(s[i:j])
    if not pieces:
        return text
    longest = max(map(len, pieces))
    out, i = [], 0
    while i < len(text):
        hit = next((j for j in range(min(len(text), i + longest), i, -1) if text[i:j] in pieces), None)
        if hit is None:
            out.append(text[i])
            i += 1
        else:
            if not out or out[-1] != MASK:
                out.append(MASK)
            i = hit
    return "".join(out)


def redact(text: object, *urls: Optional[str]) -> str:
    """`text` with the secrets of `urls` hidden: each URL where it appears whole shows with its
    password and secret query values masked, and any other piece of those secrets four characters
    or longer is masked wherever else it appears. Without `urls`, `text` is taken as the URL itself
    (``redact(url)`` for a URL to show)."""
    text = str(text)
    urls = tuple(str(u) for u in urls if u) or ((text,) if _SCHEME.match(text) else ())
    found: list[str] = []
    shown: list[str] = []
    for url in sorted(set(urls), key=len, reverse=True):
        masked, spans = _split(url)
        if spans:
            text = text.replace(url, masked)
            found += [url[a:b] for a, b in spans]
            shown.append(masked)
    if not found:
        return text
    # the URLs shown have their secrets masked already; scrub the rest (a driver quoting a piece)
    parts = re.split("(" + "|".join(re.escape(m) for m in sorted(set(shown), key=len, reverse=True)) + ")", text)
    return "".join(part if i % 2 else _scrub(part, found) for i, part in enumerate(parts))


def _scrub(text: str, secret_list: list[str]) -> str:
    while True:  # until no piece is left (masking joins text that could form a new one)
        masked = _mask_fragments(text, secret_list)
        if masked == text:
            return text
        text = masked
