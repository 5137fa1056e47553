"""Quiet by default (strata.quiet): the library noise is off in the driver and in every Ray worker
process, and `--verbose` brings it back. The full `strata run` output is checked by the README walkthrough."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

import pytest
from typer.testing import CliRunner

from strata import quiet

NOISE = ("Failed to load CPU gemm_4bit_forward", "Loading weights", "Failed to query Ray Train Controller")

# Load the test backbone (a "Loading weights" bar) after importing bitsandbytes (its CPU backend warns
# on import where the CPU has AVX512-BF16), in a fresh process as `strata run` does.
DRIVER = """
import sys
from strata import quiet
quiet.setup(verbose=sys.argv[2] == "1")
import bitsandbytes
from pathlib import Path
from strata.backbone.load import load_backbone
from strata.config import BackboneSpec
load_backbone(BackboneSpec(sys.argv[1]), Path(sys.argv[1]))
import logging
logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").warning(
    "Failed to query Ray Train Controller actor state. (a stand-in)")
"""


def _driver(backbone_dir, verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (quiet.ENV, "HF_HUB_DISABLE_PROGRESS_BARS")}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(backbone_dir), "1" if verbose else "0"], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return proc.stdout + proc.stderr


def test_the_driver_is_quiet_and_verbose_brings_the_noise_back(backbone_dir) -> None:
    out = _driver(backbone_dir, verbose=False)
    assert not [n for n in NOISE if n in out], out
    loud = _driver(backbone_dir, verbose=True)
    assert "Loading weights" in loud and "Failed to query Ray Train Controller" in loud, loud


def test_the_runtime_env_carries_the_hook_unless_verbose(monkeypatch) -> None:
    monkeypatch.delenv(quiet.ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = quiet.runtime_env({"env_vars": {"A": "1"}})
    assert env == {"env_vars": {"A": "1"}, "worker_process_setup_hook": quiet.HOOK}
    assert quiet.runtime_env({"worker_process_setup_hook": "mine.hook"}) == {"worker_process_setup_hook": "mine.hook"}
    from ray.serve.schema import LoggingConfig

    assert LoggingConfig(**quiet.serve_logging()).enable_access_log is False
    assert quiet.train_logging().log_level == "WARNING"
    monkeypatch.setenv(quiet.ENV, "1")
    assert quiet.runtime_env(None) is None and LoggingConfig(**quiet.serve_logging()).enable_access_log


def test_only_the_cleaner_threads_crash_is_dropped() -> None:
    seen, previous = [], threading.excepthook
    threading.excepthook = lambda args: seen.append(args.thread.name)
    try:
        quiet._drop_thread_crash(quiet.PG_CLEANER_THREAD)
        quiet._drop_thread_crash(quiet.PG_CLEANER_THREAD)  # idempotent: one wrapper
        for name in (quiet.PG_CLEANER_THREAD, "another"):
            t = threading.Thread(target=lambda: 1 / 0, name=name)
            t.start()
            t.join()
    finally:
        threading.excepthook = previous
    assert seen == ["another"]


def test_run_and_serve_take_verbose() -> None:
    from strata.cli import app

    for command in ("run", "serve"):
        assert "--verbose" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output


@pytest.mark.integration
def test_the_hook_reaches_actors_and_the_actors_they_start() -> None:
    """Ray Train's controller starts the workers and the detached cleaner with runtime_envs of their own;
    Ray merges the job's into them, so the hook runs there too."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def state(self) -> dict:
            import logging

            return {"bnb": logging.getLogger(quiet.BNB_LOGGER).level,
                    "cleaner": logging.getLogger(quiet.PG_CLEANER_LOGGER).level,
                    "bars": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")}

        def child(self) -> dict:
            child = Probe.options(runtime_env={"env_vars": {"OWN": "1"}}).remote()
            return ray.get(child.state.remote())

    env = {k: v for k, v in os.environ.items() if k not in (quiet.ENV, "HF_HUB_DISABLE_PROGRESS_BARS")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the raylet and its workers inherit this process's environment
    try:
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
                 runtime_env=quiet.runtime_env())
        probe = Probe.remote()
        quiet_state = {"bnb": 40, "cleaner": 40, "bars": "1"}
        assert ray.get(probe.state.remote()) == quiet_state
        assert ray.get(probe.child.remote()) == quiet_state
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_a_commands_verbose_undoes_the_quiet_default_of_strata_itself(monkeypatch) -> None:
    import logging

    monkeypatch.setenv(quiet.ENV, "0")  # recorded first, so teardown restores what was there before
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    quiet.setup(False)  # `strata` itself, before the command
    assert logging.getLogger(quiet.BNB_LOGGER).level == logging.ERROR
    quiet.setup(True)  # `strata run --verbose`
    assert logging.getLogger(quiet.BNB_LOGGER).level == logging.NOTSET
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and not quiet.runtime_env({}).get(
        "worker_process_setup_hook")
    os.environ[quiet.ENV] = "0"
    quiet.setup(False)  # leave this process quiet, as the other tests expect
