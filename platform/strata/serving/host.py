"""AdapterHost: one frozen backbone, an LRU of registry adapters, mixed-adapter batched generation.

A request names a serving id (docs/ARCHITECTURE.md): `<stream>/<adapter>@v<N>`, `<stream>/<adapter>` (its
production version, looked up on every request, so a promotion or a rollback is served on the
next one), a bare `<adapter>` in the default stream, or `<stream>/auto` (the Decoupled router,
rebuilt from the production versions' prototypes). Adapters come hash-checked from the registry.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from strata.adapters.lora import load_adapter
from strata.backbone.features import pooled_features
from strata.backbone.load import fingerprint, load_backbone, resolve
from strata.config import BackboneSpec
from strata.data.collate import Conversation, encode_conversations
from strata.generation import Cancelled, Generated, Pause, TokenCallback, generate
from strata.registry import Ref, Registry, RegistryError, parse_id
from strata.routing import ROUTER_FILE, PrototypeRouter, Routed
from strata.serving.mixed_lora import MixedLoRA


class UnknownAdapter(LookupError):
    """A serving id that names no adapter, or no production version, in the registry."""


@dataclass(frozen=True)
class Request:
    """One completion request, already decoded by the ingress."""

    model: str
    prompt: str
    images: tuple[bytes, ...] = ()
    max_tokens: int = 16
    temperature: float = 0.0
    history: Sequence[tuple[str, str]] = ()  # earlier (question, answer) turns, oldest first
    image_turns: tuple[int, ...] | None = None  # images per user turn, oldest first; None: all in the first
    raw: bool = False  # a plain completion prompt (`/v1/completions`): no chat template
    top_p: float = 1.0
    ignore_eos: bool = False  # run to max_tokens (vLLM's extension): benchmarks force the answer length
    continued: tuple[int, ...] = ()  # tokens already generated for it, before its batch paused to admit others


@dataclass(frozen=True)
class Completion:
    """What one request produced, and which exact version produced it."""

    model: str  # `<stream>/<adapter>@v<N>`
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of sequence), "length" (max_tokens), "cancelled" (the client left), "paused"
    prompt_tokens: int = 0
    route: Routed | None = None  # for `<stream>/auto`: the task it was routed to, and how far it was


@dataclass
class Stats:
    """Counters for the metrics endpoint."""

    requests: Counter = field(default_factory=Counter)  # per resolved adapter id
    seconds: Counter = field(default_factory=Counter)  # per adapter id: request seconds, for the mean latency
    loads: Counter = field(default_factory=Counter)
    evictions: Counter = field(default_factory=Counter)
    load_seconds: float = 0.0
    tokens: int = 0  # generated, streamed or not
    low_confidence: Counter = field(default_factory=Counter)  # per stream: `auto` rows far from every task


def resolve_id(registry: Registry, model_id: str, default_stream: str) -> Ref | str:
    """The exact version a serving id means now; `<stream>/auto` comes back as the stream name."""
    stream, adapter, version = parse_id(model_id, default_stream)
    if adapter == "auto":
        return stream
    # Runs for every request (ingress and replica): one or two object reads, never a directory listing.
    if version is None:
        version = registry.production(stream, adapter)
        if version is None:
            if not registry.versions(stream, adapter):  # listing only on the error path
                raise UnknownAdapter(f"no adapter {stream}/{adapter} in the registry")
            raise UnknownAdapter(f"{stream}/{adapter} has no production version")
    elif not registry.committed(Ref(stream, adapter, version)):
        if not registry.versions(stream, adapter):
            raise UnknownAdapter(f"no adapter {stream}/{adapter} in the registry")
        raise UnknownAdapter(f"no version v{version} of {stream}/{adapter}")
    return Ref(stream, adapter, version)


def adapter_name(ref: Ref) -> str:
    """The PEFT adapter name a resident version has."""
    return f"{ref.stream}--{ref.adapter}--v{ref.version}"


class AdapterHost:
    """Serve many registry adapters from one backbone, `capacity` of them resident at a time."""

    def __init__(self, registry: str, backbone: BackboneSpec, capacity: int = 8,
                 default_stream: str = "default", on_event: Callable[[str, str], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.registry = Registry(registry)
        self.spec, self.path = backbone, resolve(backbone)
        self.fingerprint = fingerprint(self.path)
        self.model, self.processor = load_backbone(backbone, self.path)
        self.capacity, self.default_stream = capacity, default_stream
        self.resident: OrderedDict[str, Ref] = OrderedDict()  # PEFT adapter name -> version, LRU order
        self.mixed: MixedLoRA | None = None
        self.released: deque[str] = deque()  # adapters to unload before the next batch (appends are thread-safe)
        self.hot: set[str] = set()  # adapters kept resident whatever the LRU says: the traffic's hot ones
        self.routers: dict[tuple, PrototypeRouter] = {}
        self.stats = Stats()
        self.on_event = on_event or (lambda event, adapter: None)  # ("load" | "evict", adapter id): metrics

    # ---- naming -------------------------------------------------------------------------------
    def resolve(self, model_id: str) -> Ref | str:
        """The exact version a serving id means now; `<stream>/auto` comes back as the stream name."""
        return resolve_id(self.registry, model_id, self.default_stream)

    def production(self) -> list[Ref]:
        """Every adapter's production version, across streams."""
        return [Ref(s, a, v) for s in self.registry.streams() for a in self.registry.adapters(s)
                if (v := self.registry.production(s, a)) is not None]

    # ---- the LRU ------------------------------------------------------------------------------
    def load(self, ref: Ref) -> str:
        """Make `ref` resident (hash-checked from the registry) and most recently used; its PEFT name."""
        name = adapter_name(ref)
        if name in self.resident:
            self.resident.move_to_end(name)
            return name
        card = self.registry.card(ref)
        if card["backbone"]["fingerprint"] != self.fingerprint:
            raise RegistryError(f"{ref} was trained on backbone {card['backbone']['fingerprint']}, but this host "
                                f"serves {self.spec.source} ({self.fingerprint})")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            self.model = load_adapter(self.model, self.registry.fetch(ref, Path(tmp)), name)
        self.resident[name] = ref
        self.stats.loads[str(ref)] += 1
        self.on_event("load", str(ref))
        self.stats.load_seconds += time.perf_counter() - started
        # The least recently used goes first; the hot ones stay, even if that leaves the LRU over capacity.
        for old in [n for n in self.resident if n not in self.hot and n != name][: max(0, len(self.resident) - self.capacity)]:
            self.unload(old)
        if self.mixed is None:
            self.mixed = MixedLoRA(self.model)
        return name

    def release(self, name: str) -> None:
        """Unload `name` before the next batch; safe to call while a batch generates in another thread."""
        self.released.append(name)

    def unload(self, name: str) -> None:
        """Drop a resident adapter (no-op when it is not resident, or is the last one: PEFT keeps one)."""
        if name not in self.resident or len(self.resident) == 1:
            return
        ref = self.resident.pop(name)
        self.model.set_adapter(next(iter(self.resident)))  # PEFT refuses to delete the active adapter
        self.model.delete_adapter(name)
        self.stats.evictions[str(ref)] += 1
        self.on_event("evict", str(ref))

    def preload(self, model_ids: list[str]) -> None:
        """Load adapters at start (serving ids), most important last so they stay resident."""
        for model_id in model_ids:
            ref = self.resolve(model_id)
            if isinstance(ref, Ref):
                self.load(ref)

    # ---- generation ---------------------------------------------------------------------------
    def complete(self, requests: list[Request], on_token: TokenCallback | None = None,
                 cancelled: Cancelled | None = None, pause: Pause | None = None) -> list[Completion]:
        """Answer a batch of requests, rows of different adapters in one forward where they fit.

        `on_token(i, token)` gets request i's tokens as they are decoded; `cancelled(i)` ends request i
        early; `pause` stops the batch early, and an unfinished request comes back "paused", with its
        tokens so far, to be continued (`Request.continued`) in a batch that others join.
        """
        while self.released:
            name = self.released.popleft()
            if name not in self.hot:
                self.unload(name)
        enc = encode_conversations(self.processor, [
            Conversation(r.prompt, r.images, tuple(r.history), r.image_turns, raw=r.raw) for r in requests])
        refs, routed = self._refs(requests, enc)
        for i, r in enumerate(requests):  # a continued request goes on from its own tokens, as if never paused
            enc.extend(i, list(r.continued))
        out: list[Completion | None] = [None] * len(requests)
        for sampling in sorted({(r.temperature, r.top_p) for r in requests}):
            rows = [i for i, r in enumerate(requests) if (r.temperature, r.top_p) == sampling]
            for chunk in self._fitting(rows, refs):
                names = [self.load(refs[i]) for i in chunk]
                tap, gone = self._taps(chunk, on_token, cancelled)
                for i, g in zip(chunk, self._generate(enc.select(chunk), names, [requests[i] for i in chunk],
                                                      *sampling, tap, gone, pause)):
                    out[i] = self._completion(requests[i], refs[i], g, len(enc.input_ids[i]), routed[i])
        return out

    def _completion(self, request: Request, ref: Ref, g: Generated, prompt: int, route: Routed | None) -> Completion:
        tokens = [*request.continued, *g.tokens]
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip() if request.continued else g.text
        if g.finish_reason != "paused":
            self.stats.requests[str(ref)] += 1
        return Completion(str(ref), text, tokens, g.finish_reason, prompt - len(request.continued), route)

    def _taps(self, chunk: list[int], on_token: TokenCallback | None,
              cancelled: Cancelled | None) -> tuple[TokenCallback, Cancelled | None]:
        """The chunk's rows' token and cancel callbacks, in the caller's request numbering; tokens are counted."""
        def tap(row: int, token: int) -> None:
            self.stats.tokens += 1
            if on_token is not None:
                on_token(chunk[row], token)

        return tap, (lambda row: cancelled(chunk[row])) if cancelled else None

    def _refs(self, requests: list[Request], enc) -> tuple[list[Ref], list[Routed | None]]:
        """The exact version each request runs with, and for `auto` rows where the router sent them."""
        refs = [self.resolve(r.model) for r in requests]
        routed: list[Routed | None] = [None] * len(requests)
        for stream in {r for r in refs if isinstance(r, str)}:  # `<stream>/auto` rows
            rows = [i for i, r in enumerate(refs) if r == stream]
            with torch.no_grad():
                picked = self.router(stream).assign(pooled_features(self.model, self.processor, enc.select(rows)))
            for i, route in zip(rows, picked):
                refs[i], routed[i] = self.resolve(f"{stream}/{route.task}"), route
                self.stats.low_confidence[stream] += route.low_confidence
        return refs, routed

    def router(self, stream: str) -> PrototypeRouter:
        """The Decoupled router over the stream's production versions that carry a prototype."""
        refs = [r for r in self.production() if r.stream == stream]
        key = tuple(refs)
        if key not in self.routers:
            found = []
            with tempfile.TemporaryDirectory() as tmp:
                for i, ref in enumerate(refs):
                    files = self.registry.verify(ref)
                    if ROUTER_FILE in files:
                        (Path(tmp) / str(i)).mkdir()
                        (Path(tmp) / str(i) / ROUTER_FILE).write_bytes(files[ROUTER_FILE])
                        found.append(PrototypeRouter.load(Path(tmp) / str(i)))
            if not found:
                raise UnknownAdapter(f"stream {stream!r} has no production adapter with a router prototype; "
                                     "`auto` needs Decoupled adapters")
            self.routers = {key: PrototypeRouter.merge(found)}
        return self.routers[key]

    def _fitting(self, rows: list[int], refs: list[Ref]) -> list[list[int]]:
        """Split rows into chunks whose distinct adapters fit in the LRU at once."""
        chunks: list[list[int]] = []
        for i in rows:
            if chunks and len({refs[j] for j in chunks[-1]} | {refs[i]}) <= self.capacity:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    @staticmethod
    def _vision_rows(enc) -> list[int] | None:
        """What the vision tower sees of each row where that is not one image per row: Qwen's patch rows,
        InternVL's and OneVision's tiles, and nothing for a text-only row."""
        pixels = enc.images.get("pixel_values")
        if pixels is None:  # a text-only batch: the tower does not run
            return None
        if enc.flat or "image_sizes" in enc.images:
            return [0 if p is None else len(p) for p in pixels]
        return [0 if p is None else 1 for p in pixels] if None in pixels else None

    def _generate(self, enc, names: list[str], requests: list[Request], temperature: float, top_p: float,
                  on_token: TokenCallback, cancelled: Cancelled | None, pause: Pause | None) -> list[Generated]:
        with self.mixed.select(names, self._vision_rows(enc)) as model:
            return generate(model, self.processor, enc, [r.max_tokens - len(r.continued) for r in requests],
                            temperature, on_token=on_token, top_p=top_p, ignore_eos=[r.ignore_eos for r in requests],
                            cancelled=cancelled, pause=pause)
