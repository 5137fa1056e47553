"""The Serve application on a real local Ray Serve: HTTP errors, the openai client, live promotion, mixed batches."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lora_helper import offline, served_registry
from PIL import Image

from strata.data.benchmark import generate_task
from strata.registry import Ref

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token"


@pytest.fixture(scope="module")
def rows():
    return generate_task("colour", 0, n_train=0, n_val=0, n_test=8).to_pylist()


@pytest.fixture(scope="module")
def served(test_spec, backbone_dir, tmp_path_factory):
    """The app running on a local Serve, with a bearer token and small limits; yields (url, registry)."""
    import ray
    from ray import serve
    from serve_apps.openai_app import app

    registry = served_registry(tmp_path_factory.mktemp("serve"), test_spec, backbone_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"registry": registry.uri, "backbone": str(backbone_dir), "capacity": 2, "token": TOKEN,
            "batch_wait_s": 0.05, "preload": ["default/seqlora"],
            "limits": {"max_body_bytes": 1_000_000, "max_image_bytes": 200_000, "max_pixels": 512 * 512}}
    serve.run(app(args), name="strata", route_prefix="/")
    yield f"http://127.0.0.1:{port}", registry, args
    serve.shutdown()
    ray.shutdown()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def chat(model: str, row: dict, image_url: str | None = None, **extra) -> dict:
    content = [{"type": "text", "text": row["prompt"]}, {"type": "image_url", "image_url": {"url": image_url or data_url(row["image"])}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            **extra}


def post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=raw or json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(out, format="PNG")
    return out.getvalue()


def test_every_bad_request_gets_a_clear_json_error_and_the_replica_stays_up(served, rows):
    url, *_ = served
    row = rows[0]
    cases = [
        (chat("default/seqlora", row), None, 401, "missing or wrong bearer token"),
        (chat("default/seqlora", row), "wrong", 401, "missing or wrong bearer token"),
        (chat("default/nope", row), TOKEN, 404, "no adapter default/nope"),
        (chat("../../etc/passwd", row), TOKEN, 400, "invalid"),
        (chat("default/seqlora", row, "data:image/png;base64,bm90IGFuIGltYWdl"), TOKEN, 400, "cannot decode the image"),
        (chat("default/seqlora", row, "data:image/png;base64,!!!"), TOKEN, 400, "not valid base64"),
        (chat("default/seqlora", row, data_url(png(1024, 1024))), TOKEN, 413, "over the limit of 262144"),
        (chat("default/seqlora", row, "http://example.com/cat.png"), TOKEN, 400, "http image URLs are disabled"),
        (chat("default/seqlora", row, max_tokens=0), TOKEN, 400, "`max_tokens` must be an integer"),
    ]
    for body, token, status, message in cases:
        code, reply = post(url, body, token)
        assert "error" in reply and (code, reply["error"]["code"]) == (status, status), (message, code, reply)
        assert message in reply["error"]["message"], reply
    code, reply = post(url, None, raw=b"{" + b" " * 1_100_000 + b"}")
    assert code == 413 and "over the limit" in reply["error"]["message"]
    code, reply = post(url, None, raw=b"{not json")
    assert code == 400 and "not JSON" in reply["error"]["message"]
    code, reply = post(url, chat("default/seqlora", row))  # after all that, the replica still answers
    assert code == 200 and reply["model"] == "default/seqlora@v1"
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=30) as stats:
        assert "default/seqlora@v1" in json.loads(stats.read())["loads"]  # preloaded at start


def test_the_openai_client_gets_offline_answers_streams_and_follows_promotion(served, rows, test_spec, backbone_dir,
                                                                                tmp_path):
    from openai import OpenAI

    url, registry, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key=TOKEN)
    row = rows[1]
    messages = chat("x", row)["messages"]
    tok_offline = offline(registry, Ref("default", "seqlora", 1), row, test_spec, backbone_dir, tmp_path)
    reply = client.chat.completions.create(model="default/seqlora", messages=messages, max_tokens=8, temperature=0)
    assert reply.model == "default/seqlora@v1" and reply.usage.completion_tokens == len(tok_offline)
    from strata.backbone.load import load_backbone

    _, processor = load_backbone(test_spec, backbone_dir)
    assert reply.choices[0].message.content == processor.tokenizer.decode(tok_offline, skip_special_tokens=True).strip()
    streamed = client.chat.completions.create(model="default/seqlora", messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    listed = [m.id for m in client.models.list().data]  # `auto`: colour and shape carry router prototypes
    assert listed == ["default/colour", "default/seqlora", "default/shape", "default/auto"]

    registry.promote(Ref("default", "seqlora", 2))  # no restart: the next request is served by v2
    after = client.chat.completions.create(model="seqlora", messages=messages, max_tokens=8, temperature=0)
    v2 = offline(registry, Ref("default", "seqlora", 2), row, test_spec, backbone_dir, tmp_path)
    assert after.model == "default/seqlora@v2"
    assert after.choices[0].message.content == processor.tokenizer.decode(v2, skip_special_tokens=True).strip()
    registry.rollback("default", "seqlora")
    assert client.chat.completions.create(model="default/seqlora", messages=messages, max_tokens=8).model == \
        "default/seqlora@v1"


def test_concurrent_requests_for_different_adapters_match_one_by_one(served, rows):
    url, *_ = served
    models = ["default/seqlora", "default/seqlora@v2", "default/colour", "default/shape", "default/auto"] * 2
    bodies = [chat(m, rows[i % len(rows)]) for i, m in enumerate(models)]
    alone = [post(url, b)[1] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(url, b)[1], bodies))
    key = [(r["model"], r["choices"][0]["message"]["content"]) for r in alone]
    assert [(r["model"], r["choices"][0]["message"]["content"]) for r in together] == key
    assert key[4][0] == "default/colour@v1"  # `auto` routed a colour question to the colour adapter
    with urllib.request.urlopen(f"{url}/ready", timeout=30) as ready:
        assert json.loads(ready.read())["status"] == "ready"
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=30) as reply:
        assert max(json.loads(reply.read())["batch_sizes"]) >= 3  # requests for different adapters shared a batch


def test_a_killed_replica_costs_under_one_percent_of_requests_and_no_wrong_answers(served, rows):
    import ray
    from ray import serve
    from serve_apps.openai_app import app

    url, _, args = served
    serve.run(app({**args, "replicas": 2}), name="strata", route_prefix="/")  # redeployed in place
    models = ["default/seqlora@v1", "default/seqlora@v2", "default/colour@v1"]
    want = {m: post(url, chat(m, rows[0]))[1]["choices"][0]["message"]["content"] for m in models}
    results: list[tuple[str, int, dict]] = []

    def client() -> None:
        for i in range(60):
            m = models[i % len(models)]
            for _ in range(5):  # a client's retries
                code, reply = post(url, chat(m, rows[0]))
                if code == 200:
                    break
                time.sleep(0.5)
            results.append((m, code, reply))

    worker = threading.Thread(target=client)
    worker.start()
    while len(results) < 10:
        time.sleep(0.05)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "AdapterServer" in a["name"]]
    assert len(replicas) == 2, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    worker.join(timeout=300)
    ok = [(m, reply) for m, code, reply in results if code == 200]
    assert len(ok) >= 0.99 * len(results) and len(results) == 60
    assert all(reply["model"] == m and reply["choices"][0]["message"]["content"] == want[m] for m, reply in ok)
