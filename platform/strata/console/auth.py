"""Sign-in and CSRF for the console: a token once, then a session cookie; every POST carries its CSRF token.

A session is a random id the server remembers (in memory: a restarted console signs everyone out).
Its CSRF token is an HMAC of the id under a per-process secret, so a page can embed it and a POST
from another site, which cannot read the page, cannot forge it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

COOKIE = "strata_console"
SESSION_S = 12 * 3600


class Sessions:
    """The signed-in sessions of one console process."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.secret = secrets.token_bytes(32)
        self.open: dict[str, float] = {}  # session id -> expiry

    def sign_in(self, token: str | None) -> str | None:
        """A new session id when the token is right (or none is configured); None otherwise."""
        if self.token is not None and not hmac.compare_digest((token or "").encode(), self.token.encode()):
            return None
        now = time.time()
        if len(self.open) >= 1000:  # cookie-less clients each start a session: forget the expired ones
            self.open = {k: expiry for k, expiry in self.open.items() if expiry > now}
        sid = secrets.token_urlsafe(24)
        self.open[sid] = now + SESSION_S
        return sid

    def valid(self, sid: str | None) -> bool:
        """Whether a cookie's session id is signed in and not expired."""
        expiry = self.open.get(sid or "")
        if expiry is None or expiry < time.time():
            self.open.pop(sid or "", None)
            return False
        return True

    def bearer(self, header: str | None) -> bool:
        """Whether an `Authorization: Bearer` header carries the token (scripts, without a session)."""
        return self.token is not None and header is not None and \
            hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())

    def csrf(self, sid: str) -> str:
        """The CSRF token the session's pages embed in every form."""
        return hmac.new(self.secret, sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str | None, sent: str | None) -> bool:
        """Whether a POST's CSRF token belongs to its session."""
        return bool(sid and sent) and hmac.compare_digest(self.csrf(sid), sent)

    def sign_out(self, sid: str | None) -> None:
        """Forget a session."""
        self.open.pop(sid or "", None)
