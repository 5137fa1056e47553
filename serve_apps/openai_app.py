"""The Strata serving application: an OpenAI-compatible ingress in front of multiplexed backbone replicas.

    serve deploy serve_apps/config.yaml        # on a cluster
    strata serve --registry runs/s/registry    # locally

`Ingress` (FastAPI) checks the token, the body and the images, and resolves the serving id to an
exact registry version, so a promotion or a rollback is served on the next request.
- A cold adapter is forwarded as the `multiplexed_model_id`: Serve's multiplexer keeps each
  replica's adapter LRU and routes the id to a replica that holds it.
- A hot adapter, and `auto`, go without an id, to the less loaded replica.
- Replicas send a heartbeat to the ingress every second: their counters go in (`/v1/stats`), and
  the hot adapters come back, to be preloaded and kept.

`AdapterServer` holds one frozen backbone per replica. Its micro-batcher gathers concurrent
requests, for any mix of adapters, into one batched generation, in a worker thread. A streamed
request's tokens are sent as they are decoded (docs/ARCHITECTURE.md, "The life of a request").
"""


import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields, replace

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from strata.config import BackboneSpec
from strata.data.collate import several_images
from strata.registry import Ref, Registry, RegistryError, parse_id
from strata.routing import ROUTER_FILE, Routed
from strata.serving.batcher import MicroBatcher, should_pause
from strata.serving.host import AdapterHost, Completion, Request, UnknownAdapter, adapter_name, resolve_id
from strata.serving.openai import (
    ApiError,
    Chunks,
    Limits,
    Streaming,
    completion_body,
    parse_chat,
    parse_completion,
    text_completion_body,
)
from strata.serving.stream import Detokenizer, Tap
from strata.serving.traffic import Reports, Traffic


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
    admit_after: int = 2  # a batch pauses after this many tokens when requests wait, and they join it; 0: never
    heartbeat_s: float = 1.0  # how often a replica reports its counters and learns what is hot
    hot_window_s: float = 10.0  # the window the ingress counts requests over
    hot_share: float = 0.25  # an adapter with this share of the window's requests is spread over all replicas
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


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def sse(event: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(event)}\n\n"


def traffic_key(model: str, default_stream: str) -> str:
    """An adapter as traffic counts it: `<stream>/<adapter>`, or `...@vN` when the request pins a version."""
    stream, adapter, version = parse_id(model, default_stream)
    return f"{stream}/{adapter}" + ("" if version is None else f"@v{version}")


def api_error(e: Exception) -> ApiError:
    """The HTTP error a failure becomes."""
    if isinstance(e, RayTaskError) and isinstance(e.cause, Exception):  # raised in a replica
        e = e.cause
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), "not_found_error", "model")
    if isinstance(e, (RegistryError, ValueError)):
        return ApiError(400, str(e), param="model")
    # A replica died or failed: the client may retry elsewhere.
    return ApiError(503, f"the adapter server failed ({type(e).__name__}); retry the request", "server_error")
logger = logging.getLogger("ray.serve")


class Resident:
    """What Serve's multiplexer holds per adapter; evicting it unloads the adapter from the host."""

    def __init__(self, host: AdapterHost, name: str) -> None:
        self.host, self.name, self.live = host, name, True

    def __del__(self) -> None:
        # Serve calls this on eviction, and the garbage collector may call it again later, after
        # the same adapter was loaded anew: only the first call may unload it. A batch may be
        # generating in its thread right now, so the host unloads it before the next batch.
        if self.live:
            self.live = False
            self.host.release(self.name)


@dataclass
class Pending:
    """A request in the micro-batcher, with the tap its tokens go to; continued after a pause."""

    request: Request
    tap: Tap
    route: Routed | None = None  # where `auto` sent it, kept when it is continued under its exact version

    def finish(self, completion: Completion) -> Completion:
        """The answer, with the route its first batch took."""
        return replace(completion, route=self.route) if self.route else completion


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
        # Serve's LRU decides what stays; the host's own bound guards what loads outside it (`auto`, hot).
        self.host = AdapterHost(self.cfg.registry, BackboneSpec(self.cfg.backbone), self.cfg.capacity + 4,
                                self.cfg.default_stream, on_event=self._count)
        self.host.preload(list(self.cfg.preload))

        async def load(model_id: str) -> Resident | None:  # a plain function: Serve keeps its LRU on it
            return await self._load(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.capacity)(load)
        # Not `serve.batch`: it splits a batch by multiplexed model id, and mixing adapters is the point.
        self.batcher = MicroBatcher(self._run, self.cfg.max_batch_size, self.cfg.batch_wait_s, again=self._again)
        self.heartbeat: asyncio.Task | None = None
        self.replica = "local"

    async def _load(self, model_id: str) -> Resident | None:
        ref = self.host.resolve(model_id)
        if isinstance(ref, str):
            return None  # `<stream>/auto`: its rows load their routed adapters in the batch
        async with self.batcher.lock:  # never while a batch generates
            return Resident(self.host, await asyncio.to_thread(self.host.load, ref))

    def _count(self, event: str, adapter: str) -> None:
        (self.loads if event == "load" else self.evictions).inc(tags={"adapter": adapter})

    def _run(self, items: list[Pending]) -> list[Completion]:
        """One batch, in the batcher's thread: every streamed row's tokens go to its tap as they come."""
        taps = [item.tap for item in items]
        return self.host.complete([item.request for item in items], on_token=lambda row, token: taps[row].put(token),
                                  cancelled=lambda row: taps[row].cancelled, pause=self._pause)

    def _pause(self, generated: int) -> bool:
        """Stop a batch that has made progress when requests wait: they join its rows' continuation
        (`should_pause` says when)."""
        return should_pause(generated, len(self.batcher.queue), self.batcher.sizes[-1], self.cfg.admit_after)

    @staticmethod
    def _again(item: Pending, completion: Completion) -> Pending | None:
        if completion.finish_reason != "paused":
            return None
        item.route = item.route or completion.route
        item.request = replace(item.request, model=completion.model, continued=tuple(completion.tokens))
        return item

    async def _admit(self, request: Request) -> None:
        """Start the heartbeat, refuse what this backbone cannot take, and load a cold adapter through Serve's
        LRU (a hot one has no multiplexed id: the batch loads it, and the heartbeat keeps it)."""
        if len(request.images) > 1 and not several_images(self.host.processor):
            raise ApiError(400, f"this backbone's family takes one image per conversation in Strata; got "
                                f"{len(request.images)}", param="messages")
        await self.check_health()
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_model(model_id)

    def _observe(self, completion: Completion, started: float) -> None:
        self.requests.inc(tags={"adapter": completion.model})
        if completion.route is not None and completion.route.low_confidence:
            self.far.inc(tags={"adapter": completion.model})
        seconds = time.perf_counter() - started
        self.latency.observe(seconds, tags={"adapter": completion.model})
        self.host.stats.seconds[completion.model] += seconds

    async def complete(self, request: Request) -> Completion:
        """Answer one request (batched with whatever else arrives within the wait)."""
        started = time.perf_counter()
        await self._admit(request)
        tap = Tap(asyncio.get_running_loop(), streamed=False)
        pending = Pending(request, tap)
        try:
            completion = pending.finish(await self.batcher.submit(pending))
        except asyncio.CancelledError:  # the client left: its row stops at the next token
            tap.cancelled = True
            raise
        self._observe(completion, started)
        return completion

    async def stream(self, request: Request) -> AsyncIterator[str | Completion]:
        """Answer one request token by token: "" once admitted, then text deltas, then the Completion."""
        started = time.perf_counter()
        await self._admit(request)
        tap, text = Tap(asyncio.get_running_loop()), Detokenizer(self.host.processor.tokenizer)
        pending = Pending(request, tap)
        answer = asyncio.ensure_future(self.batcher.submit(pending))
        answer.add_done_callback(lambda _: tap.close())
        try:
            yield ""
            while (tokens := await tap.drain()) is not None:
                if delta := "".join(text.add(t) for t in tokens):
                    yield delta
            completion = pending.finish(await answer)
            if rest := text.rest(completion.text):
                yield rest
            self._observe(completion, started)
            yield completion
        finally:  # the client left (Serve cancels this generator), or the answer is out
            tap.cancelled = not answer.done()

    async def check_health(self) -> None:
        """Serve's periodic probe; it also keeps the heartbeat going on an idle replica."""
        if self.heartbeat is None or self.heartbeat.done():
            self.heartbeat = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        """Every second: report this replica's counters to the ingress, and load and keep what is hot."""
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        ingress = serve.get_deployment_handle("Ingress", app_name=context.app_name)
        while True:
            try:
                hot = await ingress.heartbeat.remote(self.replica, self.stats())
                await self._keep(hot)
            except Exception as e:  # noqa: BLE001 - the ingress restarts or a hot adapter was deleted: next beat
                logger.warning("heartbeat failed: %s", e)
            await asyncio.sleep(self.cfg.heartbeat_s)

    async def _keep(self, hot: list[str]) -> None:
        refs = [ref for ref in (self.host.resolve(i) for i in hot) if isinstance(ref, Ref)]
        missing = [r for r in refs if adapter_name(r) not in self.host.resident]
        if missing:
            async with self.batcher.lock:
                for ref in missing:
                    await asyncio.to_thread(self.host.load, ref)
        self.host.hot = {adapter_name(r) for r in refs}

    def stats(self) -> dict:
        """This replica's counters: requests, loads and evictions per adapter version, tokens generated."""
        s = self.host.stats
        return {"requests": dict(s.requests), "seconds": dict(s.seconds), "loads": dict(s.loads), "evictions": dict(s.evictions),
                "low_confidence_routes": dict(s.low_confidence), "tokens": s.tokens, "rss_mb": rss_mb(),
                "load_seconds": s.load_seconds, "resident": [str(r) for r in self.host.resident.values()],
                "hot": sorted(self.host.hot), "batch_sizes": list(self.batcher.sizes)[-100:]}


api = FastAPI(title="Strata")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """The OpenAI chat-completions and completions API over the adapter servers."""

    def __init__(self, server: DeploymentHandle, cfg: dict) -> None:
        self.server, self.cfg = server, ServeConfig.from_args(cfg)
        self.registry = Registry(self.cfg.registry)
        self.token = self.cfg.token or os.environ.get("STRATA_SERVE_TOKEN") or None
        self.traffic = Traffic(window_s=self.cfg.hot_window_s, share=self.cfg.hot_share)
        self.reports = Reports(stale_s=3 * self.cfg.heartbeat_s + 1)  # a replica that missed three beats is gone

    def _authorize(self, request: HttpRequest) -> None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, "missing or wrong bearer token", "authentication_error")

    async def _body(self, request: HttpRequest) -> dict:
        self._authorize(request)
        raw = await request.body()
        if len(raw) > self.cfg.limits.max_body_bytes:
            raise ApiError(413, f"request body is {len(raw)} bytes, over the limit of {self.cfg.limits.max_body_bytes}")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from e

    @api.post("/v1/chat/completions")
    async def chat(self, request: HttpRequest):
        """A chat completion (streamed as server-sent events with `stream: true`)."""
        return await self._answer(request, parse_chat, completion_body, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: HttpRequest):
        """A plain-prompt completion: the prompt as it is, no chat template and no image."""
        return await self._answer(request, parse_completion, text_completion_body, chat=False)

    async def _answer(self, request: HttpRequest, parse, shape, chat: bool):
        try:
            req, streaming = parse(await self._body(request), self.cfg.limits)
            ref = resolve_id(self.registry, req.model, self.cfg.default_stream)
            if isinstance(ref, str) and (len(req.images) != 1 or req.raw):
                raise ApiError(400, "`auto` routes by the image and the question: send exactly one image", param="model")
            model_id = f"{ref}/auto" if isinstance(ref, str) else str(ref)
            # A hot adapter (and `auto`, which any replica routes) goes to the less loaded of two
            # replicas; a cold one to a replica that holds it (docs/ARCHITECTURE.md, "The life of a request").
            spread = isinstance(ref, str) or self.traffic.add(traffic_key(req.model, self.cfg.default_stream))
            req = replace(req, model=model_id)
            handle = self.server if spread else self.server.options(multiplexed_model_id=model_id)
            if streaming is None:
                return JSONResponse(shape(await handle.complete.remote(req)))
            tokens = handle.options(stream=True).stream.remote(req)
            await tokens.__anext__()  # admitted: a failure to load still gets its HTTP status
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-style error body
            error = api_error(e)
            return JSONResponse(error.body(), status_code=error.status)
        return StreamingResponse(self._events(tokens, Chunks(model_id, chat), streaming),
                                 media_type="text/event-stream")

    @staticmethod
    async def _events(tokens, chunks: Chunks, streaming: Streaming) -> AsyncIterator[str]:
        try:
            yield sse(chunks.start())
            async for item in tokens:
                if isinstance(item, Completion):
                    yield sse(chunks.finish(item))
                    if streaming.include_usage:
                        yield sse(chunks.usage(item))
                else:
                    yield sse(chunks.text(item))
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            yield sse(api_error(e).body())
        finally:  # also when the client disconnects: the replica's row stops
            tokens.cancel()

    async def heartbeat(self, replica: str, stats: dict) -> list[str]:
        """A replica's counters in; the serving ids it should hold out (the hot adapters)."""
        self.reports.put(replica, stats)
        return self.traffic.hot()

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
        """The ingress is up (a probe: no token needed)."""
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self):
        """A backbone replica answers (a probe: no token needed)."""
        try:
            await asyncio.wait_for(self.server.stats.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - not ready, whatever the reason
            return JSONResponse({"status": "not ready", "reason": str(e)}, status_code=503)
        return {"status": "ready"}

    @api.get("/v1/stats")
    async def stats(self, request: HttpRequest):
        """Every live replica's counters (from its last heartbeat, at most a second or two old) and their sum."""
        try:
            self._authorize(request)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return self.reports.view()


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
