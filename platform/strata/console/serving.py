"""The serving page's two actions: read every replica's counters from the ingress, and scale the
adapter servers of the running Serve application in place.

Scaling changes `num_replicas` of AdapterServer in the application's own `serve deploy` config and
deploys that again through the dashboard, as `serve deploy` does. Serve treats a change of
`num_replicas` alone as a lightweight update: the running replicas keep serving, and new ones
start beside them. An application started with `serve.run` (as `strata serve` does) has no such
config; Serve would restart all of it, so the console refuses (docs/ARCHITECTURE.md, "The console").
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from strata.console.config import ConsoleConfig


def serving_stats(cfg: ConsoleConfig, token: str | None) -> dict:
    """The ingress's /v1/stats: per replica and summed; an `error` key says why there is none."""
    request = urllib.request.Request(f"{cfg.serve_url.rstrip('/')}/v1/stats",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return {"error": f"{cfg.serve_url} answered HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"}
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {"error": f"no serving at {cfg.serve_url}: {e}"}


def per_adapter(stats: dict) -> list[dict]:
    """Rows of requests, mean latency, loads and evictions per adapter version, summed over replicas."""
    total = stats.get("total", {})
    ids = sorted({*total.get("requests", {}), *total.get("loads", {})})
    rows = []
    for adapter in ids:
        n = total.get("requests", {}).get(adapter, 0)
        seconds = total.get("seconds", {}).get(adapter)
        rows.append({"adapter": adapter, "requests": n, "loads": total.get("loads", {}).get(adapter, 0),
                     "evictions": total.get("evictions", {}).get(adapter, 0),
                     "mean_ms": 1e3 * seconds / n if n and seconds is not None else None})
    return rows


def scale(cfg: ConsoleConfig, replicas: int) -> None:
    """Set the adapter servers' replica count of the running application, in place."""
    if not 1 <= replicas <= 64:
        raise ValueError(f"replicas must be between 1 and 64, got {replicas}")
    try:
        client = _serve_client(cfg)
        details = client.get_serve_details()
    except Exception as e:  # whatever the SDK raises, nothing was changed
        raise RuntimeError(f"cannot read Serve's state from the Ray dashboard at {cfg.ray_dashboard}: {e}") from e
    configs = {name: app.get("deployed_app_config") for name, app in (details.get("applications") or {}).items()}
    if cfg.serve_app not in configs:
        raise RuntimeError(f"no Serve application {cfg.serve_app!r} on {cfg.ray_dashboard}")
    if None in configs.values():
        raise RuntimeError(f"application {cfg.serve_app!r} (or another on this cluster) was started with serve.run, as "
                           "`strata serve` does, not `serve deploy`: Serve would restart every replica to scale it. "
                           "Deploy it with `serve deploy serve_apps/config.yaml` to scale it here")
    app = configs[cfg.serve_app]
    others = [d for d in app.get("deployments") or [] if d["name"] != "AdapterServer"]
    server = next((d for d in app.get("deployments") or [] if d["name"] == "AdapterServer"), {"name": "AdapterServer"})
    server = {**{k: v for k, v in server.items() if k != "autoscaling_config"}, "num_replicas": replicas}
    app["deployments"] = [*others, server]
    http = details.get("http_options") or {}
    client.deploy_applications({"applications": list(configs.values()), "proxy_location": details.get("proxy_location"),
                                "http_options": {k: http[k] for k in ("host", "port") if k in http}})


def replica_states(cfg: ConsoleConfig) -> dict:
    """The adapter servers' replicas by state, as Serve's controller sees them ({} when unknown)."""
    try:
        app = (_serve_client(cfg).get_serve_details().get("applications") or {}).get(cfg.serve_app) or {}
    except Exception:  # noqa: BLE001 - the page says "unknown"
        return {}
    states: dict[str, int] = {}
    for replica in ((app.get("deployments") or {}).get("AdapterServer") or {}).get("replicas", []):
        states[replica["state"]] = states.get(replica["state"], 0) + 1
    return states


def _serve_client(cfg: ConsoleConfig):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(cfg.ray_dashboard)
