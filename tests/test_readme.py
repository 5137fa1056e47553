"""The README, followed by a new user: every `bash` and `python` block, in order, on a copy of the tree.

Long commands run in their smoke variant (the rules are in `smoke` and in the README's last
section); `bash cluster` blocks belong to test_cluster_workflows.py and `bash cloud` blocks to
test_cluster_configs.py, which this module checks by name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from strata.strategies import run_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)[ \t]*(\w*)\n(.*?)^```", re.M | re.S)
COMMENT = re.compile(r"\s+#[^'\"]*$")  # a trailing comment with no quote in it
READY = """strata_wait_ready() {  # poll /ready until the server in the background answers
  python - "$1" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 240
while True:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=5).status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"the server on port {sys.argv[1]} never became ready")
    time.sleep(2)
PY
}
"""


def blocks(tag: str | None = None, lang: str = "bash") -> list[str]:
    """The bodies of the README's fenced blocks in `lang` with the given tag (None: untagged)."""
    return [body for lg, tg, body in BLOCK.findall(README) if lg == lang and tg == (tag or "")]


def commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, trailing comments dropped."""
    out, pending = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        command = COMMENT.sub("", pending + line.strip()).strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append(command)
    return out


def smoke(command: str) -> str | None:
    """The command as the test runs it: long ones made short, `make test` skipped (it is running us)."""
    if command == "make test":
        return None
    command = command.replace("builtin:tiny", "builtin:test")
    if command == "make run":
        return "make run ARGS=--smoke-test"
    if command.startswith("strata run "):
        return command + " --smoke-test"
    return command


def script(workdir: Path) -> str:
    """One bash script of the README's untagged bash and python blocks, in the order they appear."""
    lines = ["set -euo pipefail", READY, "trap 'kill -INT $(jobs -p) 2>/dev/null; wait' EXIT"]
    for n, (lang, tag, body) in enumerate(BLOCK.findall(README)):
        if tag:
            continue
        if lang == "python":
            (workdir / f".readme-{n}.py").write_text(body)
            lines += [f"echo \"::: [$SECONDS s] python block {n}\"", f"python .readme-{n}.py"]
        elif lang == "bash":
            for command in filter(None, map(smoke, commands(body))):
                lines += [f"echo \"::: [$SECONDS s]\" {shlex.quote(command)}", command]
                if command.endswith("&"):
                    port = re.search(r"--port (\d+)", command)
                    lines.append(f"strata_wait_ready {port.group(1) if port else 8000}")
    return "\n".join(lines) + "\n"


def copy_tree(dest: Path) -> None:
    """The files a fresh clone of this tree has, with this venv (already installed: `make` must not redo it)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)  # copy2 keeps mtimes: make sees nothing to rebuild
    (dest / ".venv").symlink_to(REPO / ".venv")
    stamp = (REPO / ".venv" / ".strata-installed").stat().st_mtime
    for name in ("pyproject.toml", "constraints.txt"):  # never let make reinstall the shared venv from the copy
        os.utime(dest / name, (stamp - 1, stamp - 1))


def not_json(token: str):
    """metrics.json must be strict JSON: NaN or Infinity fail the test."""
    raise AssertionError(f"metrics.json is not strict JSON: {token}")


def test_smoke_rules_and_block_parsing() -> None:
    assert smoke("make test") is None and smoke("make run") == "make run ARGS=--smoke-test"
    assert smoke("strata run --strategy dgg") == "strata run --strategy dgg --smoke-test"
    assert smoke("strata serve --backbone builtin:tiny &") == "strata serve --backbone builtin:test &"
    assert commands("a --x \\\n    --y  # note\n# only a comment\nb 'c # d'\n") == ["a --x --y", "b 'c # d'"]


def test_every_yaml_block_is_a_valid_run_config() -> None:
    for body in blocks(lang="yaml"):
        raw = yaml.safe_load(body)
        if "backbone" in raw:  # the cluster example's model directory exists only on that cluster
            raw["backbone"]["source"] = "builtin:test"
        run_config(raw, "README yaml block")


def test_cluster_and_cloud_blocks_are_covered_by_their_tests() -> None:
    """`bash cluster` commands run in the cluster workflow tests; `bash cloud` files are schema-checked."""
    workflows = (REPO / "tests" / "test_cluster_workflows.py").read_text()
    configs = (REPO / "tests" / "test_cluster_configs.py").read_text()
    for command in (c for body in blocks("cluster") for c in commands(body)):
        key = re.search(r"jobs\.\w+|serve \w+|ray (stop|list actors)|start_local\.sh", command)
        if key and key.group(0).startswith(("jobs.", "serve ")):
            assert key.group(0) in workflows, f"README cluster command not run by a workflow test: {command}"
    for command in (c for body in blocks("cloud") for c in commands(body)):
        path = command.split()[-1]
        assert (REPO / path).is_file(), f"README cloud command names a missing file: {command}"
        assert Path(path).name in configs, f"{path} is not checked by test_cluster_configs.py"


@pytest.mark.integration
def test_a_new_user_follows_the_readme_to_a_served_answer(tmp_path: Path) -> None:
    work = tmp_path / "clone"
    copy_tree(work)
    (work / "walkthrough.sh").write_text(script(work))
    # a new user's shell: no Ray address, and Strata's default (quiet) output
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STRATA_VERBOSE")}
    proc = subprocess.run(["bash", "walkthrough.sh"], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500, check=False)
    log = proc.stdout
    steps = [line for line in proc.stdout.splitlines() if line.startswith(":::")]
    assert proc.returncode == 0, f"failed after {steps[-1:]}:\n{log[-6000:]}"

    # Quiet by default: make run shows its progress lines and tables, not the libraries' noise.
    make_run = log.split("make run ARGS=--smoke-test\n", 1)[1].split("\n::: [", 1)[0]
    for noise in ("Failed to query Ray Train Controller actor state", "Failed to load CPU gemm_4bit_forward",
                  "Loading weights", "Writing model shards"):
        assert noise not in make_run, f"{noise!r} in make run's output"
    assert "[seqlora] colour step" in make_run and "strategy comparison" in make_run
    assert not re.search(r" -- (POST /v1/chat/completions|CALL complete) ", log), "Serve's access log is on"

    # The tour's claims hold on the smoke run.
    runs = work / "runs"
    metrics = {s: json.loads((runs / "default" / s / "metrics.json").read_text(), parse_constant=not_json)
               for s in ("seqlora", "decoupled", "multitask")}
    assert metrics["seqlora"]["forgetting"] - metrics["decoupled"]["forgetting"] >= 10, metrics
    assert metrics["decoupled"]["router_accuracy"] >= 90
    for s in metrics:
        assert (runs / "default" / s / "accuracy_matrix.png").stat().st_size > 1000
        preds = pq.read_table(runs / "default" / s / "predictions.parquet")
        assert {"after_task", "task", "id", "prediction", "answer", "score"} <= set(preds.column_names)
        manifest = json.loads((runs / "default" / s / "manifest.json").read_text())
        assert manifest["config_hash"] and manifest["seed"] == 0 and len(manifest["data"]) == 2
        assert manifest["versions"]["torch"].startswith("2.")
        assert {"tasks", "faa", "mfn", "mft", "maa", "bwt", "fwt", "forgetting"} <= metrics[s].keys()
        assert len(metrics[s]["accuracy_matrix"]) == 2
    # Your own data: both formats arrived in one stream and were gated.
    mine = json.loads((runs / "mine" / "decoupled" / "metrics.json").read_text())
    assert mine["tasks"] == ["colour", "where"] and mine["versions"] == [1, 1]
    assert (runs / "merged" / "config.json").exists()
    # The served adapters answered the openai client, and rollback changed the version that answers.
    served = next(line for line in proc.stdout.splitlines() if line.startswith("served:"))
    assert all(f"default/{a}" in served for a in ("colour", "seqlora", "auto")), served
    answer = next(line for line in proc.stdout.splitlines() if "(expected:" in line)
    assert answer.split(" -> ")[1].split("(expected:")[0].strip(), answer  # a non-empty answer
    rolled_back = next(line for line in proc.stdout.splitlines() if line.startswith("answered by"))
    assert rolled_back.startswith("answered by default/seqlora@v1 -> "), rolled_back
