"""AdapterHost: one frozen backbone, an LRU of registry adapters, mixed-adapter batched generation.

A request names a serving id (docs/ARCHITECTURE.md): `<stream>/<adapter>@v<N>`, `<stream>/<adapter>` (its
production version, looked up on every request, so a promotion or a rollback is served on the
next one), a bare `<adapter>` in the default stream, or `<stream>/auto` (the Decoupled router,
rebuilt from the production versions' prototypes). Adapters come hash-checked from the registry.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from strata.adapters.lora import load_adapter
from strata.backbone.features import pooled_features
from strata.backbone.load import fingerprint, load_backbone, resolve
from strata.config import BackboneSpec
from strata.data.collate import encode_table
from strata.data.schema import HISTORY
from strata.generation import generate
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
    image: bytes
    max_tokens: int = 16
    temperature: float = 0.0
    history: Sequence[tuple[str, str]] = ()  # earlier (question, answer) turns, oldest first


@dataclass(frozen=True)
class Completion:
    """What one request produced, and which exact version produced it."""

    model: str  # `<stream>/<adapter>@v<N>`
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length" (max_tokens)
    prompt_tokens: int = 0
    route: Routed | None = None  # for `<stream>/auto`: the task it was routed to, and how far it was


@dataclass
class Stats:
    """Counters for the metrics endpoint."""

    requests: Counter = field(default_factory=Counter)  # per resolved adapter id
    loads: Counter = field(default_factory=Counter)
    evictions: Counter = field(default_factory=Counter)
    load_seconds: float = 0.0
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
        name = f"{ref.stream}--{ref.adapter}--v{ref.version}"
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
        while len(self.resident) > self.capacity:
            self.unload(next(iter(self.resident)))
        if self.mixed is None:
            self.mixed = MixedLoRA(self.model)
        return name

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
    def complete(self, requests: list[Request]) -> list[Completion]:
        """Answer a batch of requests, rows of different adapters in one forward where they fit."""
        enc = encode_table(self.processor, pa.table({
            "image": pa.array([r.image for r in requests], pa.binary()),
            "prompt": [r.prompt for r in requests], "answer": [""] * len(requests),
            "history": pa.array([[{"question": q, "answer": a} for q, a in r.history] for r in requests], HISTORY)}),
            with_answers=False)
        refs, routed = self._refs(requests, enc)
        out: list[Completion | None] = [None] * len(requests)
        for temperature in sorted({r.temperature for r in requests}):
            rows = [i for i, r in enumerate(requests) if r.temperature == temperature]
            for chunk in self._fitting(rows, refs):
                names = [self.load(refs[i]) for i in chunk]
                for i, c in zip(chunk, self._generate(enc.select(chunk), names, [requests[i] for i in chunk],
                                                      temperature)):
                    out[i] = Completion(str(refs[i]), *c, prompt_tokens=len(enc.input_ids[i]), route=routed[i])
                    self.stats.requests[str(refs[i])] += 1
        return out

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

    def _generate(self, enc, names: list[str], requests: list[Request],
                  temperature: float) -> list[tuple[str, list[int], str]]:
        # Qwen's and InternVL's towers take every image's rows in one tensor, OneVision's every image's real tiles.
        flat = enc.flat or "image_sizes" in enc.images
        with self.mixed.select(names, [len(p) for p in enc.images["pixel_values"]] if flat else None) as model:
            out = generate(model, self.processor, enc, [r.max_tokens for r in requests], temperature)
        return [(g.text, g.tokens, g.finish_reason) for g in out]
