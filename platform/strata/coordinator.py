"""The stream coordinator: one named, detached Ray actor per stream that owns its continual state.

It keeps the task timeline (arrived → training → evaluated → promoted | rejected, or failed), the
adapter versions, and for each promoted task the state records its strategy named through the
`state_records` hook: the task optimum θ* (its adapter) and whatever else defines the strategy
(freeze masks, replay reservoirs, a Fisher, a router), each as a path and a content hash. The
coordinator does not know what a record means; tensors and rows stay in storage.
Every change is written to `<storage>/<stream>/coordinator.json` (temp file, then rename) before
the call returns, so a restarted actor (`max_restarts=-1`) reloads exactly what was acknowledged.
Calls are idempotent per owner because Ray retries a call that was in flight when the actor died.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from strata.config import check_name
from strata.storage import exists, normal_uri, open_storage, read_json, write_json

STATUSES = ("arrived", "training", "evaluated", "promoted", "rejected", "failed")
FINAL = ("promoted", "rejected")
NAMESPACE = "strata"


class TaskBusy(RuntimeError):
    """A second job tried to start a task that another job is training."""


class StreamState:
    """The coordinator's logic as a plain object (the actor wraps it; tests can use it directly)."""

    def __init__(self, stream: str, storage: str) -> None:
        self.stream = check_name(stream, "stream name")
        self.storage = storage
        self.fs, root = open_storage(storage)
        self.dir = f"{root}/{stream}"
        self.path = f"{self.dir}/coordinator.json"
        self.fs.create_dir(self.dir, recursive=True)
        self.reloaded = exists(self.fs, self.path)
        if self.reloaded:
            self.state = read_json(self.fs, self.path)
        else:
            self.state = {"stream": stream, "schema": 2, "strategies": {}}
        self.started = time.time()

    # ---- reading --------------------------------------------------------------------------
    def info(self) -> dict:
        """Who is answering: process id, start time and whether state came back from storage."""
        return {"stream": self.stream, "storage": self.storage, "pid": os.getpid(),
                "started": self.started, "reloaded": self.reloaded}

    def snapshot(self) -> dict:
        """A copy of the whole state."""
        return json.loads(json.dumps(self.state))

    def timeline(self, strategy: str) -> list[dict]:
        """The tasks of one strategy's stream, in arrival order, with their status and history."""
        return self.snapshot()["strategies"].get(strategy, {}).get("timeline", [])

    # ---- changing (each call persists before it returns) ----------------------------------
    def reset(self, strategy: str, owner: str) -> None:
        """Forget a strategy's stream (a fresh `strata run`); refused while another job trains it."""
        for entry in self.timeline(strategy):
            if entry["status"] == "training" and entry["owner"] != owner:
                raise TaskBusy(self._busy(strategy, entry))
        self.state["strategies"].pop(strategy, None)
        self._save()

    def begin_task(self, strategy: str, task: str, owner: str) -> dict:
        """Mark `task` training for `owner`; the same owner may call again, anyone else is refused."""
        check_name(task, "task name")
        entry = self._entry(strategy, task)
        if entry is None:
            entry = {"task": task, "status": "arrived", "owner": owner, "attempt": 0, "history": []}
            self._strategy(strategy)["timeline"].append(entry)
            self._mark(entry, "arrived")
        elif entry["status"] == "training" and entry["owner"] == owner:
            return dict(entry)  # a retried call: nothing new
        elif entry["status"] == "training":
            raise TaskBusy(self._busy(strategy, entry))
        elif entry["status"] in ("promoted", "evaluated"):
            raise TaskBusy(f"task {task!r} of stream {self.stream!r} ({strategy}) is already "
                           f"{entry['status']}; a task is learned once per stream")
        else:  # failed or rejected: a new attempt comes after whatever was learned meanwhile
            timeline = self._strategy(strategy)["timeline"]
            timeline.append(timeline.pop(timeline.index(entry)))
        entry.update(owner=owner, attempt=entry["attempt"] + 1, run_id=uuid.uuid4().hex[:8])
        self._mark(entry, "training")
        self._save()
        return dict(entry)

    def set_status(self, strategy: str, task: str, owner: str, status: str, **info: Any) -> dict:
        """Move a task the caller owns to `status` (evaluated, failed, ...) and record `info`."""
        if status not in STATUSES:
            raise ValueError(f"unknown task status {status!r}; known: {STATUSES}")
        entry = self._owned(strategy, task, owner)
        if entry["status"] != status:
            self._mark(entry, status)
        entry.update(info)
        self._save()
        return dict(entry)

    def commit_task(self, strategy: str, task: str, owner: str, status: str, record: dict) -> dict:
        """Finish a task: promoted (with its adapter version and state records) or rejected."""
        if status not in FINAL:
            raise ValueError(f"commit_task needs one of {FINAL}, got {status!r}")
        entry = self._owned(strategy, task, owner)
        if entry["status"] in FINAL:
            return dict(entry)  # a retried call after the write: already done
        s = self._strategy(strategy)
        if status == "promoted":
            adapter = record["adapter"]
            entry["version"] = adapter["version"]  # allocated by next_version before the push
            s["adapters"].setdefault(adapter["name"], []).append({**adapter, "task": task})
            s.setdefault("records", {})[task] = record.get("records", {})  # θ* and the strategy's state after this task
        entry.update({k: v for k, v in record.items() if k in ("accuracy", "metrics", "reasons")})
        self._mark(entry, status)
        self._save()
        return dict(entry)

    def next_version(self, stream_adapter: str) -> int:
        """Allocate the next registry version of an adapter (`<stream>/<adapter>`); never handed out twice.

        A call retried after a restart may skip a number; gaps are harmless, duplicates are not.
        """
        counters = self.state.setdefault("versions", {})
        counters[stream_adapter] = counters.get(stream_adapter, 0) + 1
        self._save()
        return counters[stream_adapter]

    def release(self, strategy: str, task: str) -> dict:
        """Mark a task left `training` by a dead job as failed, so it can be trained again."""
        entry = self._entry(strategy, task)
        if entry is None:
            raise KeyError(f"stream {self.stream!r} ({strategy}) has no task {task!r}")
        if entry["status"] == "training":
            self._mark(entry, "failed")
            entry["reasons"] = ["released by an operator"]
            self._save()
        return dict(entry)

    # ---- internals ---------------------------------------------------------------------------
    def _strategy(self, strategy: str) -> dict:
        return self.state["strategies"].setdefault(
            strategy, {"timeline": [], "records": {}, "adapters": {}})

    def _entry(self, strategy: str, task: str) -> dict | None:
        return next((e for e in self._strategy(strategy)["timeline"] if e["task"] == task), None)

    def _owned(self, strategy: str, task: str, owner: str) -> dict:
        entry = self._entry(strategy, task)
        if entry is None:
            raise KeyError(f"stream {self.stream!r} ({strategy}) has no task {task!r}; call begin_task first")
        if entry["owner"] != owner:
            raise TaskBusy(f"task {task!r} of stream {self.stream!r} belongs to job {entry['owner']}, not {owner}")
        return entry

    def _busy(self, strategy: str, entry: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["history"][-1]["time"]))
        return (f"task {entry['task']!r} of stream {self.stream!r} ({strategy}) is already training in job "
                f"{entry['owner']} (since {since}); wait for it, or if that job died run "
                f"`strata coordinator release {self.stream} {strategy} {entry['task']}`")

    @staticmethod
    def _mark(entry: dict, status: str) -> None:
        entry["status"] = status
        entry["history"].append({"status": status, "time": time.time()})

    def _save(self) -> None:
        write_json(self.fs, self.path, self.state)


def default_storage(out: str | Path, storage: str | None = None) -> str:
    """Where a stream's coordinator state lives: `storage` if set, else `<out>/coordinator`."""
    return storage or str(Path(out).resolve() / "coordinator")


def actor_name(stream: str, storage: str) -> str:
    """The Ray actor name of a stream's coordinator: a stream is its name inside its storage."""
    where = hashlib.sha256(normal_uri(storage).encode()).hexdigest()[:8]
    return f"coordinator:{check_name(stream, 'stream name')}:{where}"


class Coordinator:
    """A handle on a stream's coordinator: the detached Ray actor when Ray is up, else in-process."""

    def __init__(self, stream: str, storage: str, use_ray: bool = True) -> None:
        import ray

        self.actor = None
        if use_ray and ray.is_initialized():
            remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(StreamState)
            self.actor = remote.options(name=actor_name(stream, storage), namespace=NAMESPACE,
                                        lifetime="detached", get_if_exists=True).remote(stream, storage)
        else:
            self.local = StreamState(stream, storage)
            self.lock = threading.Lock()  # threads of one process take turns, as calls to the actor do

    def __getattr__(self, method: str):
        """Call a StreamState method on the actor (blocking) or in-process."""
        if method.startswith("_"):
            raise AttributeError(method)
        if self.actor is None:
            call = getattr(self.local, method)

            def locked(*args, **kwargs):
                with self.lock:
                    return call(*args, **kwargs)
            return locked
        import ray

        remote = getattr(self.actor, method)
        return lambda *args, **kwargs: ray.get(remote.remote(*args, **kwargs))
