"""The Strata serving application: an OpenAI-compatible ingress in front of multiplexed backbone replicas.

    serve deploy serve_apps/config.yaml        # on a cluster
    strata serve --registry runs/s/registry    # locally

`Ingress` (FastAPI) checks the token, the body and the image, resolves the serving id to an exact
registry version (so a promotion or a rollback is served on the next request) and forwards it as
the `multiplexed_model_id`. `AdapterServer` holds one frozen backbone per replica; Serve's
multiplexer keeps the replica's adapter LRU and routes each id to a replica that holds it, and
a micro-batcher gathers concurrent requests, for any mix of adapters, into one batched generation.
"""


import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from strata.config import BackboneSpec
from strata.registry import Ref, Registry, RegistryError
from strata.routing import ROUTER_FILE
from strata.serving.batcher import MicroBatcher
from strata.serving.host import AdapterHost, Completion, Request, UnknownAdapter, resolve_id
from strata.serving.openai import ApiError, Limits, completion_body, parse_chat, stream_chunks


@dataclass(frozen=True)
class ServeConfig:
    """Everything `serve deploy` args or `strata serve` flags set."""

    registry: str = "runs/stream/registry"
    backbone: str = "builtin:tiny"
    default_stream: str = "default"
    capacity: int = 8  # adapters resident per replica (Serve's multiplexed LRU)
    preload: tuple[str, ...] = ()  # serving ids loaded when a replica starts
    max_batch_size: int = 16
    batch_wait_s: float = 0.005  # how long the micro-batcher waits for more requests
    token: str | None = None  # bearer token; None: $STRATA_SERVE_TOKEN, and no auth when that is unset
    replicas: int | None = None  # fixed AdapterServer replicas; None: the deployment config (autoscaling)
    limits: Limits = field(default_factory=Limits)

    @staticmethod
    def from_args(args: dict) -> "ServeConfig":
        """Fill the config from `serve deploy` args (unknown keys are an error)."""
        known = {f.name for f in fields(ServeConfig)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown serve arg(s) {sorted(unknown)}; known: {sorted(known)}")
        args = dict(args)
        if "limits" in args:
            args["limits"] = Limits(**args["limits"])
        if "preload" in args:
            args["preload"] = tuple(args["preload"])
        return ServeConfig(**args)


class Resident:
    """What Serve's multiplexer holds per adapter; evicting it unloads the adapter from the host."""

    def __init__(self, host: AdapterHost, name: str) -> None:
        self.host, self.name, self.live = host, name, True

    def __del__(self) -> None:
        # Serve calls this on eviction, and the garbage collector may call it again later, after
        # the same adapter was loaded anew: only the first call may unload it.
        if self.live:
            self.live = False
            self.host.unload(self.name)


# Serve's default of 5 requests in flight per replica would cap every micro-batch at 5.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class AdapterServer:
    """One frozen backbone and its resident adapters; micro-batches requests of any adapters."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = ServeConfig.from_args(cfg)
        self.requests = metrics.Counter("strata_adapter_requests", "Completions per adapter version.",
                                        tag_keys=("adapter",))
        self.latency = metrics.Histogram("strata_adapter_latency_s", "Completion latency per adapter version.",
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], tag_keys=("adapter",))
        self.loads = metrics.Counter("strata_adapter_loads", "Adapter loads per version.", tag_keys=("adapter",))
        self.evictions = metrics.Counter("strata_adapter_evictions", "Adapter evictions per version.",
                                         tag_keys=("adapter",))
        self.far = metrics.Counter("strata_low_confidence_routes",
                                   "`auto` requests far from every task's prototype, answered by the nearest.",
                                   tag_keys=("adapter",))
        # Serve's LRU decides what stays; the host's own bound only guards `auto` rows loaded outside it.
        self.host = AdapterHost(self.cfg.registry, BackboneSpec(self.cfg.backbone), self.cfg.capacity + 4,
                                self.cfg.default_stream, on_event=self._count)
        self.host.preload(list(self.cfg.preload))

        async def load(model_id: str) -> Resident | None:  # a plain function: Serve keeps its LRU on it
            return await self._load(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.capacity)(load)
        # Not `serve.batch`: it splits a batch by multiplexed model id, and mixing adapters is the point.
        self.batcher = MicroBatcher(self.host.complete, self.cfg.max_batch_size, self.cfg.batch_wait_s)

    async def _load(self, model_id: str) -> Resident | None:
        ref = self.host.resolve(model_id)
        if isinstance(ref, str):
            return None  # `<stream>/auto`: its rows load their routed adapters in the batch
        return Resident(self.host, self.host.load(ref))

    def _count(self, event: str, adapter: str) -> None:
        (self.loads if event == "load" else self.evictions).inc(tags={"adapter": adapter})

    async def complete(self, request: Request) -> Completion:
        """Answer one request (batched with whatever else arrives within the wait)."""
        started = time.perf_counter()
        await self.get_model(serve.get_multiplexed_model_id())
        completion = await self.batcher.submit(request)
        self.requests.inc(tags={"adapter": completion.model})
        if completion.route is not None and completion.route.low_confidence:
            self.far.inc(tags={"adapter": completion.model})
        self.latency.observe(time.perf_counter() - started, tags={"adapter": completion.model})
        return completion

    def stats(self) -> dict:
        """This replica's counters: requests, loads and evictions per adapter version."""
        s = self.host.stats
        return {"requests": dict(s.requests), "loads": dict(s.loads), "evictions": dict(s.evictions),
                "low_confidence_routes": dict(s.low_confidence),
                "load_seconds": s.load_seconds, "resident": [str(r) for r in self.host.resident.values()],
                "batch_sizes": list(self.batcher.sizes)[-100:]}


api = FastAPI(title="Strata")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """The OpenAI chat-completions API over the adapter servers."""

    def __init__(self, server: DeploymentHandle, cfg: dict) -> None:
        self.server, self.cfg = server, ServeConfig.from_args(cfg)
        self.registry = Registry(self.cfg.registry)
        self.token = self.cfg.token or os.environ.get("STRATA_SERVE_TOKEN") or None

    def _authorize(self, request: HttpRequest) -> None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, "missing or wrong bearer token", "authentication_error")

    @api.post("/v1/chat/completions")
    async def chat(self, request: HttpRequest):
        """A chat completion (streamed as server-sent events with `stream: true`)."""
        try:
            self._authorize(request)
            raw = await request.body()
            if len(raw) > self.cfg.limits.max_body_bytes:
                raise ApiError(413, f"request body is {len(raw)} bytes, over the limit of "
                                    f"{self.cfg.limits.max_body_bytes}")
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise ApiError(400, f"the request body is not JSON: {e}") from e
            req, stream = parse_chat(body, self.cfg.limits)
            ref = resolve_id(self.registry, req.model, self.cfg.default_stream)
            model_id = f"{ref}/auto" if isinstance(ref, str) else str(ref)
            handle = self.server.options(multiplexed_model_id=model_id)
            completion = await handle.complete.remote(replace(req, model=model_id))
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except UnknownAdapter as e:
            return JSONResponse(ApiError(404, str(e), "not_found_error", "model").body(), status_code=404)
        except (RegistryError, ValueError) as e:
            return JSONResponse(ApiError(400, str(e), param="model").body(), status_code=400)
        except Exception as e:  # noqa: BLE001 - a replica died or failed: the client may retry elsewhere
            return JSONResponse(ApiError(503, f"the adapter server failed ({type(e).__name__}); retry the request",
                                         "server_error").body(), status_code=503)
        if stream:
            return StreamingResponse(self._events(completion), media_type="text/event-stream")
        return JSONResponse(completion_body(completion))

    @staticmethod
    async def _events(completion: Completion):
        words = completion.text.split(" ")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)] if completion.text else []
        for chunk in stream_chunks(completion, pieces):
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    @api.get("/v1/models")
    async def models(self, request: HttpRequest):
        """Every production adapter, by its serving id."""
        try:
            self._authorize(request)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        data = []
        for s in self.registry.streams():
            routed = False  # `<stream>/auto` is listed when a production version carries a router prototype
            for a in self.registry.adapters(s):
                version = self.registry.production(s, a)
                if version is not None:
                    data.append({"id": f"{s}/{a}", "object": "model", "owned_by": "strata",
                                 "version": f"v{version}"})
                    routed = routed or ROUTER_FILE in self.registry.files(Ref(s, a, version))
            if routed:
                data.append({"id": f"{s}/auto", "object": "model", "owned_by": "strata", "version": "router"})
        return {"object": "list", "data": data}

    @api.get("/health")
    async def health(self) -> dict:
        """The ingress is up."""
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self):
        """A backbone replica answers."""
        try:
            await asyncio.wait_for(self.server.stats.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - not ready, whatever the reason
            return JSONResponse({"status": "not ready", "reason": str(e)}, status_code=503)
        return {"status": "ready"}

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        """One replica's per-adapter counters (Prometheus has them for all replicas)."""
        return await self.server.stats.remote()


def load_config(path: str) -> tuple[dict, dict]:
    """The app's args and http options from a `serve deploy` config file."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f)
    return raw["applications"][0].get("args", {}), raw.get("http_options", {})


def app(args: dict):
    """The application builder `serve deploy` and `strata serve` call with the config's args."""
    parsed = ServeConfig.from_args(args)
    cfg = asdict(parsed)
    server = AdapterServer.options(num_replicas=parsed.replicas) if parsed.replicas else AdapterServer
    return Ingress.bind(server.bind(cfg), cfg)
