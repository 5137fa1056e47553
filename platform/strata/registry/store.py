"""The adapter registry: immutable, content-hashed versions under `<root>/<stream>/<adapter>/v<N>/`.

A version holds the adapter's files (PEFT format, plus Strata side files) and `card.json`, and is
committed by `MANIFEST.json`, written last with every file's hash: readers ignore a directory
without one, so a push that dies half-way is invisible, on a local disk or an object store alike.
Version numbers come from the caller (the coordinator), so concurrent pushes never collide.

What changes after a push is the stage (candidate, production, rejected, archived), kept on the
card with its history, and the `production` alias in `<adapter>/ALIASES.json`, which is the one
source of truth for what is served.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from strata.config import check_name
from strata.digest import sha256
from strata.registry.card import BackboneInfo, IncompatibleAdapter, check_compatible
from strata.storage import exists, open_storage, read_bytes, read_json, write_bytes, write_json

MANIFEST = "MANIFEST.json"
CARD = "card.json"
ALIASES = "ALIASES.json"
STREAM = "STREAM.json"
STAGES = ("candidate", "production", "rejected", "archived")
VERSION_RE = re.compile(r"v([1-9][0-9]*)")


class RegistryError(ValueError):
    """A registry operation that cannot be done, with what and where."""


class HashMismatch(RegistryError):
    """A stored file does not match the hash its version was committed with."""


@dataclass(frozen=True)
class Ref:
    """One version of one adapter: `<stream>/<adapter>@v<N>`."""

    stream: str
    adapter: str
    version: int

    def __str__(self) -> str:
        return f"{self.stream}/{self.adapter}@v{self.version}"


ID_RE = re.compile(r"(?:([^/@]+)/)?([^/@]+)(?:@v([1-9][0-9]*))?")


def parse_id(text: str, default_stream: str | None = None) -> tuple[str, str, int | None]:
    """Split `<stream>/<adapter>[@v<N>]` (or a bare adapter in the default stream), names validated."""
    m = ID_RE.fullmatch(text or "")
    if m is None:
        raise RegistryError(f"invalid adapter id {text!r}: expected <stream>/<adapter>[@v<N>]")
    stream, adapter, version = m.groups()
    stream = stream or default_stream
    if stream is None:
        raise RegistryError(f"adapter id {text!r} names no stream: expected <stream>/<adapter>[@v<N>]")
    return check_name(stream, "stream name"), check_name(adapter, "adapter name"), int(version) if version else None


class Registry:
    """A registry rooted at a local directory or any pyarrow.fs URI."""

    def __init__(self, root: str) -> None:
        self.uri = root
        self.fs, self.root = open_storage(root)

    # ---- paths ---------------------------------------------------------------------------------
    def _adapter_dir(self, stream: str, adapter: str) -> str:
        return f"{self.root}/{check_name(stream, 'stream name')}/{check_name(adapter, 'adapter name')}"

    def _dir(self, ref: Ref) -> str:
        return f"{self._adapter_dir(ref.stream, ref.adapter)}/v{ref.version}"

    # ---- writing a version ---------------------------------------------------------------------
    def push(self, ref: Ref, src: Path, card: dict, backbone: BackboneInfo,
             side: dict[str, Path] | None = None) -> dict:
        """Write `src`'s files (plus `side` files) as candidate version `ref`; returns its card.

        Refuses an adapter that does not fit the stream's backbone before writing anything.
        """
        files = {str(p.relative_to(src)): p for p in sorted(src.rglob("*")) if p.is_file()}
        for name, path in (side or {}).items():
            if name in files or name in (MANIFEST, CARD):
                raise RegistryError(f"side file {name!r} of {ref} clashes with an adapter file")
            files[name] = path
        check_compatible(ref, src, backbone)
        self._pin_backbone(ref, backbone)
        where = self._dir(ref)
        if exists(self.fs, f"{where}/{MANIFEST}"):
            raise RegistryError(f"{ref} is already committed; versions are immutable (allocate a new number)")
        hashes = {}
        for name, path in files.items():
            data = path.read_bytes()
            hashes[name] = {"sha256": sha256(data), "bytes": len(data)}
            self._put(f"{where}/{name}", data)
        now = time.time()
        card = {**card, "stream": ref.stream, "adapter": ref.adapter, "version": ref.version, "created": now,
                "files": hashes, "backbone": backbone.card(), "stage": "candidate",
                "history": [{"stage": "candidate", "time": now, "reason": "pushed"}]}
        self._put(f"{where}/{CARD}", _json(card))
        # The commit point: a version without its manifest does not exist for any reader.
        self._put(f"{where}/{MANIFEST}", _json({"version": ref.version, "created": now, "files": hashes}))
        return card

    def _put(self, path: str, data: bytes) -> None:
        """Write one object (the single place a push writes, so tests can make it fail)."""
        write_bytes(self.fs, path, data)

    def _pin_backbone(self, ref: Ref, backbone: BackboneInfo) -> None:
        """The first push pins the stream's backbone; later pushes must match it."""
        path = f"{self.root}/{ref.stream}/{STREAM}"
        if exists(self.fs, path):
            pinned = read_json(self.fs, path)["backbone"]
            if pinned["fingerprint"] != backbone.fingerprint:
                raise IncompatibleAdapter(
                    f"{ref} was trained on backbone {backbone.source} (fingerprint {backbone.fingerprint}), but "
                    f"stream {ref.stream!r} is pinned to {pinned['source']} (fingerprint {pinned['fingerprint']})")
        else:
            write_json(self.fs, path, {"stream": ref.stream, "backbone": backbone.card()})

    # ---- reading -------------------------------------------------------------------------------
    def streams(self) -> list[str]:
        """Every stream with at least one adapter."""
        return sorted(i.base_name for i in self._list(self.root) if i.type == pafs.FileType.Directory)

    def adapters(self, stream: str) -> list[str]:
        """Every adapter of a stream."""
        where = f"{self.root}/{check_name(stream, 'stream name')}"
        return sorted(i.base_name for i in self._list(where) if i.type == pafs.FileType.Directory)

    def versions(self, stream: str, adapter: str) -> list[int]:
        """Committed versions of an adapter, oldest first (directories without a manifest are skipped)."""
        where = self._adapter_dir(stream, adapter)
        found = [int(m.group(1)) for i in self._list(where) if (m := VERSION_RE.fullmatch(i.base_name))]
        return sorted(v for v in found if exists(self.fs, f"{where}/v{v}/{MANIFEST}"))

    def committed(self, ref: Ref) -> bool:
        """Whether `ref` is a committed version (its manifest exists)."""
        return exists(self.fs, f"{self._dir(ref)}/{MANIFEST}")

    def files(self, ref: Ref) -> list[str]:
        """The names of a committed version's files, from its manifest (nothing is read or hashed)."""
        self._committed(ref)
        return sorted(read_json(self.fs, f"{self._dir(ref)}/{MANIFEST}")["files"])

    def card(self, ref: Ref) -> dict:
        """The card of a committed version, with its stage as served now."""
        self._committed(ref)
        card = read_json(self.fs, f"{self._dir(ref)}/{CARD}")
        card["stage"] = self._stage(card, self.production(ref.stream, ref.adapter))
        return card

    def production(self, stream: str, adapter: str) -> int | None:
        """The version the `production` alias points at, if any."""
        return self._aliases(stream, adapter).get("production")

    def resolve(self, stream: str, adapter: str, version: int | str | None = None) -> Ref:
        """A Ref for `version`: a number, `production` (the default) or `latest`."""
        if version in (None, "production"):
            number = self.production(stream, adapter)
            if number is None:
                raise RegistryError(f"{stream}/{adapter} has no production version")
        elif version == "latest":
            committed = self.versions(stream, adapter)
            if not committed:
                raise RegistryError(f"{stream}/{adapter} has no committed version")
            number = committed[-1]
        else:
            number = int(version)
        return Ref(stream, adapter, number)

    def verify(self, ref: Ref) -> dict[str, bytes]:
        """Every file of a version, checked against its manifest; raises HashMismatch naming the file."""
        where = self._committed(ref)
        contents = {}
        for name, want in read_json(self.fs, f"{where}/{MANIFEST}")["files"].items():
            data = read_bytes(self.fs, f"{where}/{name}")
            got = sha256(data)
            if got != want["sha256"]:
                raise HashMismatch(f"{ref}: {name} has sha256 {got[:16]}…, but the version was committed with "
                                   f"{want['sha256'][:16]}…; refusing to load it")
            contents[name] = data
        return contents

    def fetch(self, ref: Ref, dest: Path) -> Path:
        """Copy a verified version to a local directory `dest` (created); returns it."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.verify(ref).items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
        return dest

    # ---- stages --------------------------------------------------------------------------------
    def set_stage(self, ref: Ref, stage: str, reason: str, **fields) -> dict:
        """Record a stage change (and fields such as the gate's verdict) on the card."""
        if stage not in STAGES:
            raise RegistryError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        card = self.card(ref)
        card.update(fields, stage=stage)
        card["history"].append({"stage": stage, "time": time.time(), "reason": reason})
        write_json(self.fs, f"{self._dir(ref)}/{CARD}", card)
        return card

    def promote(self, ref: Ref, reason: str = "promoted", force: bool = False, **fields) -> dict:
        """Point `production` at `ref` and archive the version it replaces; `fields` go on its card."""
        card = self.card(ref)
        if card["stage"] == "rejected" and not force:
            raise RegistryError(f"{ref} was rejected by the gate ({'; '.join(card.get('reasons', []))}); "
                                "pass force to promote it anyway")
        aliases = self._aliases(ref.stream, ref.adapter)
        before = aliases.get("production")
        if before == ref.version:
            return self.set_stage(ref, "production", reason, **fields) if fields else card
        aliases["production"] = ref.version
        aliases.setdefault("history", []).append({"version": ref.version, "time": time.time(), "reason": reason})
        write_json(self.fs, f"{self._adapter_dir(ref.stream, ref.adapter)}/{ALIASES}", aliases)  # the switch
        card = self.set_stage(ref, "production", reason, **fields)
        if before is not None:
            self.set_stage(Ref(ref.stream, ref.adapter, before), "archived", f"replaced by v{ref.version}")
        return card

    def rollback(self, stream: str, adapter: str, to: int | None = None) -> Ref:
        """Serve an earlier version again: `to`, or the one that was production before the current one."""
        current = self.production(stream, adapter)
        if to is None:
            served = [h["version"] for h in self._aliases(stream, adapter).get("history", [])]
            earlier = [v for v in reversed(served) if v != current]
            if not earlier:
                raise RegistryError(f"{stream}/{adapter} has no earlier production version to roll back to")
            to = earlier[0]
        ref = Ref(stream, adapter, to)
        self.promote(ref, reason=f"rollback from v{current}")
        return ref

    def gc(self, stream: str, adapter: str, keep: int, grace_s: float = 3600.0) -> list[str]:
        """Delete archived versions beyond the newest `keep`, and uncommitted leftovers older than `grace_s`."""
        if keep < 0:
            raise RegistryError(f"keep must be >= 0, got {keep}")
        where = self._adapter_dir(stream, adapter)
        committed = self.versions(stream, adapter)
        archived = [v for v in committed if self.card(Ref(stream, adapter, v))["stage"] == "archived"]
        doomed = [f"v{v}" for v in archived[: max(len(archived) - keep, 0)]]
        for info in self._list(where):
            m = VERSION_RE.fullmatch(info.base_name)
            if m and int(m.group(1)) not in committed and self._age(info.path) > grace_s:
                doomed.append(info.base_name)  # a push that died before its manifest
        for name in doomed:
            self.fs.delete_dir(f"{where}/{name}")
        return doomed

    # ---- internals -----------------------------------------------------------------------------
    def _committed(self, ref: Ref) -> str:
        """The directory of a committed version; refuses one without a manifest."""
        where = self._dir(ref)
        if not self.committed(ref):
            known = self.versions(ref.stream, ref.adapter)
            raise RegistryError(f"no committed version {ref} (committed: {', '.join(f'v{v}' for v in known) or 'none'})")
        return where

    def _aliases(self, stream: str, adapter: str) -> dict:
        path = f"{self._adapter_dir(stream, adapter)}/{ALIASES}"
        return read_json(self.fs, path) if exists(self.fs, path) else {}

    @staticmethod
    def _stage(card: dict, production: int | None) -> str:
        if card["version"] == production:
            return "production"
        # A card still saying production lost the alias (a promote died before archiving it).
        return "archived" if card["stage"] == "production" else card["stage"]

    def _list(self, where: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))

    def _age(self, where: str) -> float:
        infos = self.fs.get_file_info(pafs.FileSelector(where, recursive=True))
        newest = max((i.mtime.timestamp() for i in infos if i.mtime is not None), default=0.0)
        return time.time() - newest


def _json(obj: dict) -> bytes:
    return json.dumps(obj, indent=1, allow_nan=False).encode()
