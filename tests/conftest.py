"""Shared fixtures: the small test backbone (pretrained once per session) and a local Ray."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from strata.config import BackboneSpec

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# The longest files, started first so that `make test`'s two workers end together (longest first).
LONGEST_FIRST = ("test_readme.py", "test_cluster_workflows.py", "test_console_browser.py", "test_fault_tolerance.py",
                 "test_parity.py", "test_serve_app.py", "test_continual_quality_bench.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the longest test files first; the rest keep their order."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core box spin for nothing."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def backbone_dir() -> Path:
    """The builtin:test backbone, built and pretrained on first use (under a minute), then cached."""
    from strata.backbone.tiny import ensure_builtin

    return ensure_builtin("builtin:test")


@pytest.fixture(scope="session")
def test_spec(backbone_dir: Path) -> BackboneSpec:
    """A spec that loads the test backbone from its local directory, as a user's model would."""
    return BackboneSpec(str(backbone_dir))


@pytest.fixture()
def backbone(test_spec: BackboneSpec, backbone_dir: Path):
    """A fresh frozen (model, processor) pair."""
    from strata.backbone.load import load_backbone

    return load_backbone(test_spec, backbone_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray per test module, in a fresh temp dir so no stale cluster file is joined."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """A local Ray with its dashboard on a free loopback port: Ray's state API needs it."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=tmp)
    yield ray
    ray.shutdown()
