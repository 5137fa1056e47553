"""A browser-like HTTP client for the console tests: a cookie jar, no redirects followed unless asked,
and a live console on a free loopback port (uvicorn in a thread: real HTTP, nothing mocked)."""

from __future__ import annotations

import http.cookiejar
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import uvicorn


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@dataclass
class Reply:
    status: int
    text: str
    headers: dict


class Browser:
    """Requests with the session cookie a browser would keep."""

    def __init__(self, base: str) -> None:
        self.base, self.jar = base, http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def _send(self, request: urllib.request.Request) -> Reply:
        try:
            with self.opener.open(request, timeout=120) as r:
                return Reply(r.status, r.read().decode(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read().decode(), dict(e.headers))

    def get(self, path: str, html: bool = True, **headers) -> Reply:
        accept = {"Accept": "text/html"} if html else {"Accept": "application/json"}
        return self._send(urllib.request.Request(self.base + path, headers={**accept, **headers}))

    def post(self, path: str, form: dict, **headers) -> Reply:
        data = urllib.parse.urlencode(form).encode()
        return self._send(urllib.request.Request(self.base + path, data=data, headers={
            "Accept": "text/html", "Content-Type": "application/x-www-form-urlencoded", **headers}))

    def csrf(self, path: str = "/streams") -> str:
        """The CSRF token a page of this session embeds."""
        return re.search(r'name="csrf" value="([0-9a-f]+)"', self.get(path).text).group(1)

    def sign_in(self, token: str) -> Reply:
        return self.post("/signin", {"token": token, "next": "/streams"})


class LiveConsole:
    """The console app served by uvicorn in a daemon thread."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the console did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def browser(self) -> Browser:
        return Browser(self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
