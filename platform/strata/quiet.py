"""Quiet by default: the library noise Strata's commands keep off the terminal unless `--verbose`.

What is silenced, where it comes from:

1. Ray Train's PlacementGroupCleaner actor warns "Failed to query Ray Train Controller actor state"
   on every poll (each second) when the State API is unreachable, which it is on a local Ray without
   the dashboard; on a machine running several Ray instances its monitor thread dies with a traceback.
   Its logger is raised to ERROR and that thread's crash is dropped.
2. bitsandbytes' CPU backend warns "Failed to load CPU gemm_4bit_forward from kernels-community" when
   it is imported (in every process); its logger is raised to ERROR before the import.
3. transformers' tqdm bars ("Loading weights", "Writing model shards") on every load and save:
   HF_HUB_DISABLE_PROGRESS_BARS, which transformers reads when imported (and the switch, when it was).
4. Ray Serve's access log, a line per request from the proxy and each replica: `serve_logging()`.

Ray Train's own INFO lines (worker group started, checkpoint written) go to WARNING too
(`train_logging()`); Ray keeps every level in its session's log files (logs/train/ray-train-sys-*).

Ray runs code in other processes: the Train controller, the Train workers, the detached cleaner and
the Serve replicas. `runtime_env()` puts `setup_worker` in the job's runtime_env as Ray's
`worker_process_setup_hook`, which every worker process of the job runs when it starts, before any task
(Ray merges a job's runtime_env into its actors' and tasks' own, and Serve gives replicas the job's).
The driver calls `setup()` at the command's edge, before the libraries are imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings

HOOK = "strata.quiet.setup_worker"
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
ENV = "STRATA_VERBOSE"  # "1": nothing is silenced, in this process and in what it starts


def is_verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def setup(verbose: bool = False) -> None:
    """Call first in a command: `--verbose` keeps everything, else the noise above is silenced here.

    `strata --verbose` and a command's own `--verbose` both land here, in either order: a later
    verbose call undoes what an earlier quiet one silenced in this process.
    """
    if verbose:
        os.environ[ENV] = "1"
    if is_verbose():
        _restore()
    else:
        _silence()


def _restore() -> None:
    logging.getLogger(BNB_LOGGER).setLevel(logging.NOTSET)
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.NOTSET)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        del os.environ["HF_HUB_DISABLE_PROGRESS_BARS"]
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].enable_progress_bar()


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: the same silencing in every worker process. Never raises (Ray
    would kill a worker whose hook fails)."""
    with contextlib.suppress(Exception):  # quiet is best effort; the worker must start
        _silence()


def runtime_env(env: dict | None = None) -> dict | None:
    """`env` (a ray.init runtime_env) with `setup_worker` as its setup hook, unless verbose, unless
    the job already has a hook (a Ray job's runtime_env and ray.init's are merged; two hooks conflict)."""
    if is_verbose() or (env or {}).get("worker_process_setup_hook") or "worker_process_setup_hook" in os.environ.get(
            "RAY_JOB_CONFIG_JSON_ENV_VAR", ""):  # set in a Ray job's driver: the job's own config
        return env
    return {**(env or {}), "worker_process_setup_hook": HOOK}


def ray_logging_level() -> int:
    """The driver's `ray` logger ("Started a local Ray instance", ...)."""
    return logging.INFO if is_verbose() else logging.WARNING


def train_logging():
    """Ray Train's LoggingConfig: its INFO lines on the console only when verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


def serve_logging() -> dict:
    """Ray Serve's LoggingConfig (for serve.start and serve.run): the access log only when verbose."""
    return {"enable_access_log": is_verbose()}


def _silence() -> None:
    logging.getLogger(BNB_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    _drop_thread_crash(PG_CLEANER_THREAD)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "huggingface_hub" in sys.modules:  # already imported: turn the bars off in place
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].disable_progress_bar()
    # peft asks `model.is_gradient_checkpointing`, which transformers 5 deprecates: nothing to act on.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _drop_thread_crash(name: str) -> None:
    """Drop the traceback of a thread called `name` that dies; other threads' go to the previous hook."""
    previous = threading.excepthook
    if getattr(previous, "strata_drops", None) == name:
        return

    def hook(args) -> None:
        if args.thread is None or args.thread.name != name:
            previous(args)

    hook.strata_drops = name
    threading.excepthook = hook
