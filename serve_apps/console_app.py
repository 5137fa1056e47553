"""The Strata console as a Serve application, on the same proxy and port as the serving API:

    applications:
      - name: console
        route_prefix: /console
        import_path: serve_apps.console_app:app
        args: {runs: runs, registry: runs/stream/registry, ...}   # strata.console.config.ConsoleConfig

Serve's proxy listens on every address by default, so this console needs a token: `token` in the
args or $STRATA_CONSOLE_TOKEN on the nodes. Without one it stays locked: the probes answer, every
other route says how to set the token. Sessions are signed with a key derived from the token, so
any replica accepts a session another one signed (docs/ARCHITECTURE.md, "The console").
"""

import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

from strata.console.app import OPEN, create_app
from strata.console.config import ConsoleConfig

LOCKED = ("this console has no token: set STRATA_CONSOLE_TOKEN on the cluster's nodes (or `token` in the console "
          "application's args) and deploy again")


def locked() -> FastAPI:
    """The console's stand-in while no token is set: probes only."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @api.api_route("/{path:path}", methods=["GET", "POST"])
    async def refuse(path: str) -> JSONResponse:
        if f"/{path}" in OPEN:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": LOCKED}, status_code=503)

    return api


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Console:
    """One console replica: the web app, built on the replica from the application's args."""

    def __init__(self, args: dict) -> None:
        args = {**args, "token": args.get("token") or os.environ.get("STRATA_CONSOLE_TOKEN") or None}
        self.cfg = ConsoleConfig.from_args(args)

    def __serve_build_asgi_app__(self) -> FastAPI:
        if self.cfg.token is None:
            return locked()
        return create_app(self.cfg, os.environ.get("STRATA_SERVE_TOKEN"))


def app(args: dict):
    """The application builder `serve deploy` calls with the config's args (a bad arg fails the deploy, named)."""
    ConsoleConfig.from_args(args)
    return Console.bind(args)
