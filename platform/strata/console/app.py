"""The console's web app: server-rendered pages (Jinja2) and a little JavaScript, no build step.

Every route but /health and /signin needs a signed-in session when a token is set (or the token as
a bearer header, for scripts); every POST needs the session's CSRF token. Actions use the same code
as the CLI: `strata.registry.commands` for promote and roll back, `jobs/` entrypoints for launches.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from strata import strategies
from strata.config import check_name
from strata.console import launch, serving
from strata.console.auth import COOKIE, SESSION_S, SIGNED_OUT, Sessions
from strata.console.config import ConsoleConfig
from strata.console.streams import StreamDir, find_streams, read_stream
from strata.registry.commands import promote_version, rollback_version, version_rows
from strata.registry.store import Ref, Registry, RegistryError
from strata.tune import OPTIONS

OPEN = ("/health", "/ready", "/signin", "/static/console.css")


class Refused(Exception):
    """A user error: shown on the page with its HTTP status, nothing changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(cfg: ConsoleConfig, serve_token: str | None = None) -> FastAPI:
    """The console for one config; `serve_token` is the serving API's bearer token, for its stats."""
    api = FastAPI(title="Strata console", docs_url=None, redoc_url=None, openapi_url=None)
    pages = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))
    pages.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"
    pages.filters["pct"] = lambda v: "—" if v is None else f"{v:.1f}"
    sessions = Sessions(cfg.token, cfg.runs / SIGNED_OUT)
    state: dict = {}  # lazily made clients (Ray's job client connects on creation)

    def jobs() -> launch.Jobs:
        if "jobs" not in state:
            state["jobs"] = launch.Jobs(cfg)
        return state["jobs"]

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        sid = request.state.sid
        html = pages.get_template(name).render(csrf=sessions.csrf(sid) if sid else "", signed=cfg.token is not None,
                                               path=route(request), root=root(request), cfg=cfg, **context)
        return HTMLResponse(html, status_code=status)

    def signed_in_as(response: Response, request: Request, sid: str) -> Response:
        response.set_cookie(COOKIE, sid, max_age=SESSION_S, path=root(request) or "/", httponly=True,
                            samesite="strict")
        return response

    @api.middleware("http")
    async def signed_in(request: Request, call_next) -> Response:
        sid = request.cookies.get(COOKIE)
        request.state.sid, fresh = (sid if sessions.valid(sid) else None), None
        if request.state.sid is None and route(request) not in OPEN:
            if sessions.bearer(request.headers.get("authorization")):
                request.state.bearer = True
            elif cfg.token is None:  # nothing to sign in with: a session only to carry the CSRF token
                request.state.sid = fresh = sessions.sign_in(None)
            elif request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return go(request, f"/signin?next={quote(route(request))}")
            else:
                return JSONResponse({"error": "sign in first: missing or wrong session or token"}, status_code=401)
        response = await call_next(request)
        return signed_in_as(response, request, fresh) if fresh else response

    async def posted(request: Request) -> dict:
        """The form of a POST whose CSRF token belongs to its session (a bearer caller needs none)."""
        form = await form_of(request)
        if not getattr(request.state, "bearer", False) and not sessions.csrf_ok(request.state.sid, form.get("csrf")):
            raise Refused(403, "the form's CSRF token is missing or not this session's: reload the page and try again")
        return form

    @api.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> HTMLResponse:
        return page(request, "message.html", status=e.status, title=f"HTTP {e.status}", message=str(e))

    @api.get("/health")
    @api.get("/ready")
    async def health() -> dict:
        """A probe: no sign-in."""
        return {"status": "ok"}

    @api.get("/signin", response_class=HTMLResponse)
    async def signin_form(request: Request, next: str = "/streams") -> HTMLResponse:
        return page(request, "signin.html", next=own_page(next), error=None)

    @api.post("/signin")
    async def signin(request: Request) -> Response:
        form = await form_of(request)
        target = own_page(form.get("next", ""))
        sid = sessions.sign_in(form.get("token"))
        if sid is None:
            return page(request, "signin.html", status=401, next=target, error="wrong token")
        return signed_in_as(go(request, target), request, sid)

    @api.post("/signout")
    async def signout(request: Request) -> Response:
        await posted(request)
        sessions.sign_out(request.state.sid)
        response = go(request, "/signin")
        response.delete_cookie(COOKIE, path=root(request) or "/")
        return response

    @api.get("/")
    async def home(request: Request) -> Response:
        return go(request, "/streams")

    # ---- streams ----------------------------------------------------------------------------
    @api.get("/streams", response_class=HTMLResponse)
    async def streams(request: Request) -> HTMLResponse:
        return page(request, "streams.html", streams=find_streams(cfg.runs))

    def stream_view(out: str, stream: str) -> dict:
        try:
            return read_stream(cfg.runs, StreamDir(out, stream))
        except (ValueError, FileNotFoundError) as e:
            raise Refused(404, str(e)) from e

    @api.get("/streams/{out}/{stream}", response_class=HTMLResponse)
    async def stream_page(request: Request, out: str, stream: str) -> HTMLResponse:
        return page(request, "stream.html", out=out, stream=stream, view=stream_view(out, stream))

    @api.get("/streams/{out}/{stream}/live", response_class=HTMLResponse)
    async def stream_live(request: Request, out: str, stream: str) -> HTMLResponse:
        """The part of the stream page that changes while a run goes on (the page polls it)."""
        return page(request, "stream_live.html", out=out, stream=stream, view=stream_view(out, stream))

    # ---- registry ---------------------------------------------------------------------------
    def registry() -> Registry:
        return Registry(cfg.registry)

    @api.get("/registry", response_class=HTMLResponse)
    async def registry_page(request: Request) -> HTMLResponse:
        reg = registry()
        adapters = [(s, a, reg.versions(s, a), reg.production(s, a)) for s in reg.streams() for a in reg.adapters(s)]
        return page(request, "registry.html", adapters=adapters)

    def checked(stream: str, adapter: str) -> tuple[str, str]:
        try:
            return check_name(stream, "stream name"), check_name(adapter, "adapter name")
        except ValueError as e:
            raise Refused(400, str(e)) from e

    @api.get("/registry/{stream}/{adapter}", response_class=HTMLResponse)
    async def adapter_page(request: Request, stream: str, adapter: str, done: str = "") -> HTMLResponse:
        stream, adapter = checked(stream, adapter)
        reg = registry()
        if not reg.versions(stream, adapter):
            raise Refused(404, f"no adapter {stream}/{adapter} in registry {cfg.registry}")
        cards = [reg.card(Ref(stream, adapter, v)) for v in reversed(reg.versions(stream, adapter))]
        return page(request, "adapter.html", stream=stream, adapter=adapter, cards=cards,
                    production=reg.production(stream, adapter), done=done)

    @api.get("/registry/{stream}/{adapter}/diff", response_class=HTMLResponse)
    async def diff_page(request: Request, stream: str, adapter: str, a: int, b: int) -> HTMLResponse:
        stream, adapter = checked(stream, adapter)
        try:
            rows = version_rows(registry(), Ref(stream, adapter, a), Ref(stream, adapter, b))
        except (RegistryError, FileNotFoundError) as e:
            raise Refused(404, str(e)) from e
        return page(request, "diff.html", stream=stream, adapter=adapter, a=a, b=b, rows=rows)

    @api.post("/registry/{stream}/{adapter}/promote")
    async def promote(request: Request, stream: str, adapter: str) -> Response:
        form = await posted(request)
        stream, adapter = checked(stream, adapter)
        try:
            ref = promote_version(registry(), f"{stream}/{adapter}@v{int(form.get('version', ''))}", stream,
                                  force=form.get("force") == "on", by="the console")
        except (RegistryError, ValueError) as e:
            raise Refused(400, str(e)) from e
        return go(request, f"/registry/{stream}/{adapter}?done=promoted+v{ref.version}")

    @api.post("/registry/{stream}/{adapter}/rollback")
    async def rollback(request: Request, stream: str, adapter: str) -> Response:
        form = await posted(request)
        stream, adapter = checked(stream, adapter)
        to = form.get("to") or None
        try:
            before, ref = rollback_version(registry(), f"{stream}/{adapter}", stream, int(to) if to else None)
        except (RegistryError, ValueError) as e:
            raise Refused(400, str(e)) from e
        return go(request, f"/registry/{stream}/{adapter}?done=rolled+back+v{before}+to+v{ref.version}")

    # ---- launch and jobs --------------------------------------------------------------------
    @api.get("/launch", response_class=HTMLResponse)
    async def launch_page(request: Request) -> HTMLResponse:
        try:
            listed, error = await asyncio.to_thread(lambda: jobs().list()), None
        except Exception as e:  # noqa: BLE001 - the page still shows the forms
            listed, error = [], f"cannot reach the Ray dashboard at {cfg.ray_dashboard}: {e}"
        return page(request, "launch.html", jobs=listed, error=error, spaces=launch.sweep_files(cfg),
                    strategies=strategies.names(), link=lambda job_id: launch.job_link(cfg, job_id))

    async def submit(request: Request, make) -> Response:
        try:
            checked_launch = make()
        except (ValueError, FileNotFoundError) as e:
            raise Refused(400, f"not launched: {e}") from e
        try:
            job_id = await asyncio.to_thread(jobs().submit, checked_launch)
        except (RuntimeError, ConnectionError) as e:  # the job API's refusal, e.g. its agent is not up yet
            raise Refused(503, f"the Ray cluster at {cfg.ray_dashboard} did not take the job: {e}") from e
        return go(request, f"/jobs/{job_id}")

    @api.post("/launch/arrival")
    async def launch_arrival(request: Request) -> Response:
        f = await posted(request)
        fields = [f.get(k, "") for k in ("out", "stream", "task", "dataset", "strategy", "steps")]
        return await submit(request, lambda: launch.arrival(cfg, *fields, f.get("gate", "enforce")))

    @api.post("/launch/sweep")
    async def launch_sweep(request: Request) -> Response:
        f = await posted(request)
        options = {k: f.get(k, "") for k in OPTIONS}
        return await submit(request, lambda: launch.sweep(cfg, f.get("space", ""), f.get("out", ""), options))

    def job_info(job_id: str):
        try:
            return jobs().get(job_id)
        except (ValueError, RuntimeError) as e:
            raise Refused(404, f"no job {job_id!r}: {e}") from e
        except ConnectionError as e:
            raise Refused(503, f"cannot reach the Ray dashboard at {cfg.ray_dashboard}: {e}") from e

    @api.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job_page(request: Request, job_id: str) -> HTMLResponse:
        info = await asyncio.to_thread(job_info, job_id)
        meta = info.metadata or {}
        trials = launch.read_trials(Path(meta["out"])) if meta.get(launch.TAG) == "sweep" else None
        logs = await asyncio.to_thread(jobs().logs, job_id)
        return page(request, "job.html", job=info, meta=meta, trials=trials, logs=logs[-20000:],
                    link=launch.job_link(cfg, job_id), stream=meta.get("stream"))

    @api.post("/jobs/{job_id}/stop")
    async def job_stop(request: Request, job_id: str) -> Response:
        await posted(request)
        await asyncio.to_thread(job_info, job_id)
        await asyncio.to_thread(jobs().stop, job_id)
        return go(request, f"/jobs/{job_id}")

    @api.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
    async def job_logs(job_id: str) -> str:
        await asyncio.to_thread(job_info, job_id)
        return await asyncio.to_thread(jobs().logs, job_id)

    # ---- serving ----------------------------------------------------------------------------
    @api.get("/serving", response_class=HTMLResponse)
    async def serving_page(request: Request, done: str = "") -> HTMLResponse:
        stats = await asyncio.to_thread(serving.serving_stats, cfg, serve_token)
        states = await asyncio.to_thread(serving.replica_states, cfg)
        return page(request, "serving.html", stats=stats, rows=serving.per_adapter(stats), done=done,
                    replicas=len(stats.get("replicas", {})), states=states)

    @api.get("/serving/stats")
    async def serving_json() -> dict:
        """The same counters as JSON (the page polls them)."""
        stats = await asyncio.to_thread(serving.serving_stats, cfg, serve_token)
        return {**stats, "adapters": serving.per_adapter(stats)}

    @api.post("/serving/scale")
    async def serving_scale(request: Request) -> Response:
        form = await posted(request)
        try:
            replicas = int(form.get("replicas", ""))
            await asyncio.to_thread(serving.scale, cfg, replicas)
        except ValueError as e:
            raise Refused(400, f"not scaled: {e}") from e
        except RuntimeError as e:
            raise Refused(409, f"not scaled: {e}") from e
        return go(request, f"/serving?done=scaled+to+{replicas}+replicas")

    @api.get("/static/console.css")
    async def css() -> Response:
        return Response((Path(__file__).parent / "templates" / "console.css").read_text(), media_type="text/css")

    return api


def root(request: Request) -> str:
    """Where the console is mounted: "" on its own server, the route prefix on Serve (or uvicorn --root-path)."""
    return request.scope.get("root_path", "").rstrip("/")


def route(request: Request) -> str:
    """The request's path below the mount point, as the routes name it."""
    path, mount = request.scope["path"], root(request)
    return (path[len(mount):] or "/") if mount and path.startswith(mount) else path


def own_page(target: str) -> str:
    """Where sign-in may send the browser: a path of this console; "//host" or "/\\host" would leave it."""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/streams"


def go(request: Request, target: str) -> RedirectResponse:
    """A 303 to one of the console's own pages, under its mount point."""
    return RedirectResponse(root(request) + target, status_code=303)


async def form_of(request: Request) -> dict[str, str]:
    """A URL-encoded form's fields (the console's forms upload no files; the last of a repeated field wins)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise Refused(415, "send the form as application/x-www-form-urlencoded")
    return dict(parse_qsl((await request.body()).decode(errors="replace"), keep_blank_values=True))
