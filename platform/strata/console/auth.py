"""Sign-in and CSRF for the console: a token once, then a session cookie; every POST carries its CSRF token.

A session is signed, not stored: its cookie holds an expiry and a random nonce, with an HMAC over
both under a key derived from the token. So a restarted console, or another replica of it on Serve,
keeps everyone signed in, and a new token signs everyone out. A POST's CSRF token is another HMAC,
of the session, which a page embeds and another site, unable to read the page, cannot forge.
Signing out is remembered in a small file beside the runs, so every replica, and a restarted
console, refuses that session until it would have expired.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path

from strata.atomic import write_text

COOKIE = "strata_console"
SESSION_S = 12 * 3600
SIGNED_OUT = ".console-signed-out.json"  # under the console's runs directory


class Sessions:
    """Signs and checks the sessions of consoles that share one token."""

    def __init__(self, token: str | None, signed_out: Path | None = None) -> None:
        self.token = token
        # No token: sessions only carry the CSRF token, and a per-process key is enough.
        self.key = hmac.new(token.encode(), b"strata-console-session", hashlib.sha256).digest() if token \
            else secrets.token_bytes(32)
        self.file = signed_out  # nonce -> expiry of signed-out sessions, shared by the consoles on these runs
        self.signed_out: dict[str, int] = {}
        self.read_at: float | None = None  # the file's mtime when last read

    def _mac(self, what: str) -> str:
        return hmac.new(self.key, what.encode(), hashlib.sha256).hexdigest()

    def sign_in(self, token: str | None) -> str | None:
        """A new session when the token is right (or none is configured); None otherwise."""
        if self.token is not None and not hmac.compare_digest((token or "").encode(), self.token.encode()):
            return None
        body = f"{int(time.time()) + SESSION_S}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._mac(body)}"

    def valid(self, sid: str | None) -> bool:
        """Whether a cookie's session was signed with this key, has not expired, and was not signed out."""
        expiry, nonce, mac = _parts(sid)
        return bool(mac) and hmac.compare_digest(mac, self._mac(f"{expiry}.{nonce}")) \
            and int(expiry) > time.time() and nonce not in self._signed_out()

    def bearer(self, header: str | None) -> bool:
        """Whether an `Authorization: Bearer` header carries the token (scripts, without a session)."""
        return self.token is not None and header is not None and \
            hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())

    def csrf(self, sid: str) -> str:
        """The CSRF token the session's pages embed in every form."""
        return self._mac(f"csrf:{sid}")

    def csrf_ok(self, sid: str | None, sent: str | None) -> bool:
        """Whether a POST's CSRF token belongs to its session."""
        return bool(sid and sent) and hmac.compare_digest(self.csrf(sid), sent)

    def sign_out(self, sid: str | None) -> None:
        """Refuse this session from now on, here and in every console that shares the file."""
        expiry, nonce, mac = _parts(sid)
        if mac:
            now = time.time()
            self.signed_out = {n: e for n, e in self._signed_out().items() if e > now} | {nonce: int(expiry)}
            if self.file is not None:
                write_text(self.file, json.dumps(self.signed_out))

    def _signed_out(self) -> dict[str, int]:
        """The signed-out sessions, re-read when another console changed the file."""
        try:
            mtime = self.file.stat().st_mtime if self.file is not None else self.read_at
        except FileNotFoundError:  # nobody has signed out yet
            mtime = self.read_at
        if mtime != self.read_at:
            self.read_at, self.signed_out = mtime, json.loads(self.file.read_text())
        return self.signed_out


def _parts(sid: str | None) -> tuple[str, str, str]:
    """(expiry, nonce, mac) of a well-formed session cookie; empty strings otherwise."""
    parts = (sid or "").split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return "", "", ""
    return parts[0], parts[1], parts[2]
