"""The cluster files are valid: the launcher YAML against Ray's own schema, the KubeRay manifests
against their CRDs' required fields, and every path, module and flag they name exists in the repo."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"

# Required fields of the ray.io/v1 CRDs (KubeRay 1.1+), as dotted paths.
POD = ("template.spec.containers",)
REQUIRED = {
    "RayCluster": ("spec.headGroupSpec.rayStartParams", *(f"spec.headGroupSpec.{p}" for p in POD),
                   "spec.workerGroupSpecs"),
    "RayJob": ("spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.rayStartParams",
               *(f"spec.rayClusterSpec.headGroupSpec.{p}" for p in POD)),
    "RayService": ("spec.serveConfigV2", "spec.rayClusterConfig.headGroupSpec.rayStartParams",
                   *(f"spec.rayClusterConfig.headGroupSpec.{p}" for p in POD)),
}
WORKER_GROUP = ("groupName", "rayStartParams", "template.spec.containers", "minReplicas", "maxReplicas")


def get(doc: dict, dotted: str):
    """The value at a dotted path; KeyError names the path."""
    node = doc
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"missing {dotted}")
        node = node[key]
    return node


def test_the_launcher_config_passes_rays_schema_and_its_own_checks() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws-h100.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` checks, after filling defaults
    assert config["head_node_type"] in config["available_node_types"]
    gpu = config["available_node_types"]["h100"]["resources"]
    assert gpu["GPU"] == 8 and gpu["h100"] == 8
    assert all((ROOT / src).exists() for src in config["file_mounts"].values())
    assert any("constraints.txt" in c for c in config["setup_commands"]) and (ROOT / "constraints.txt").exists()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_workers": "eight"}, schema)  # the check can fail


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-stream.yaml", "rayservice.yaml"])
def test_kuberay_manifests_have_their_crds_required_fields(name: str) -> None:
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and re.fullmatch(r"[a-z0-9-]+", doc["metadata"]["name"])
    for path in REQUIRED[doc["kind"]]:
        get(doc, path)
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    for group in cluster["workerGroupSpecs"]:
        for path in WORKER_GROUP:
            get(group, path)
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"strata:latest"}  # built by cluster/Dockerfile


def test_the_dockerfile_copies_what_exists() -> None:
    lines = (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
    copied = [p for line in lines if line.startswith("COPY") for p in line.split()[1:-1]]
    assert copied and all((ROOT / p).exists() for p in copied)


def test_the_rayjob_entrypoint_is_a_job_module_and_its_flags_exist() -> None:
    doc = yaml.safe_load((KUBERAY / "rayjob-stream.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and (ROOT / (argv[2].replace(".", "/") + ".py")).exists()
    from strata import cli

    help_text = CliRunner().invoke(cli.app, ["run", "--help"], terminal_width=200).output
    flags = [a for a in argv[3:] if a.startswith("--")]
    assert flags and all(f in help_text for f in flags), [f for f in flags if f not in help_text]
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


@pytest.mark.parametrize("source", ["kuberay/rayservice.yaml", "serve_apps/config.yaml"])
def test_serve_configs_import_the_app_and_their_args_parse(source: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    path = KUBERAY / "rayservice.yaml" if source.startswith("kuberay") else ROOT / source
    doc = yaml.safe_load(path.read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc
    # What `serve deploy` (and KubeRay) check first: e.g. a local working_dir is refused there.
    ServeDeploySchema.model_validate(serve_config)
    application, *rest = serve_config["applications"]
    assert [a["name"] for a in rest] in ([], ["console"])
    module, attr = application["import_path"].split(":")
    app_module = importlib.import_module(module)
    assert callable(getattr(app_module, attr))
    app_module.ServeConfig.from_args(application["args"])
    assert {d["name"] for d in application["deployments"]} <= {"AdapterServer", "Ingress"}
    with pytest.raises(ValueError, match="unknown serve arg"):
        app_module.ServeConfig.from_args({**application["args"], "capacty": 3})
    for console in rest:  # the web console beside it, under its own route prefix
        from serve_apps.console_app import app as console_app

        from strata.console.config import ConsoleConfig

        assert console["import_path"] == "serve_apps.console_app:app" and console["route_prefix"] == "/console"
        assert console["args"]["registry"] == application["args"]["registry"]  # it promotes what is served
        console_app(console["args"])
        with pytest.raises(ValueError, match="unknown key.*console args: data_root"):
            ConsoleConfig.from_args({**console["args"], "data_root": ["data"]})
        with pytest.raises(ValueError, match="data_roots must be a list"):
            ConsoleConfig.from_args({**console["args"], "data_roots": "data"})
        assert ConsoleConfig.from_args(console["args"]).data_roots == tuple(map(Path, console["args"]["data_roots"]))


def test_the_runtime_env_example_is_a_valid_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert (ROOT / env["env_vars"]["PYTHONPATH"]).is_dir()
