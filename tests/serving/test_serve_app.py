"""The Serve application on a real local Ray Serve: HTTP errors, the openai client, live promotion, mixed batches."""

from __future__ import annotations

import base64
import http.client
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(test_spec, backbone_dir, tmp_path_factory):
    """The app running on a local Serve, with a bearer token and small limits; yields (url, registry, args,
    the Ray dashboard's address)."""
    import ray
    from ray import serve
    from serve_apps.openai_app import app

    registry = served_registry(tmp_path_factory.mktemp("serve"), test_spec, backbone_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    port = free_port()
    # The dashboard's port is Ray's pick: one chosen here could be taken by Ray's own components meanwhile.
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                       _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"registry": registry.uri, "backbone": str(backbone_dir), "capacity": 2, "token": TOKEN,
            "batch_wait_s": 0.05, "preload": ["default/seqlora"],
            "limits": {"max_body_bytes": 1_000_000, "max_image_bytes": 200_000, "max_pixels": 512 * 512}}
    serve.run(app(args), name="strata", route_prefix="/")
    yield f"http://127.0.0.1:{port}", registry, args, f"http://{context.dashboard_url}"
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


def stats(url: str, token: str | None = TOKEN) -> dict:
    """/v1/stats after the replicas' next heartbeat."""
    time.sleep(1.5)
    request = urllib.request.Request(f"{url}/v1/stats", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


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
    assert "default/seqlora@v1" in stats(url)["total"]["loads"]  # preloaded at start


def test_the_openai_client_gets_offline_answers_streams_and_follows_promotion(served, rows, test_spec, backbone_dir,
                                                                                tmp_path):
    from openai import OpenAI

    url, registry, *_ = served
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
    assert max(stats(url)["total"]["batch_sizes"]) >= 3  # requests for different adapters shared a batch


def events(url: str, body: dict, stop_after: int | None = None) -> list[tuple[float, dict | str]]:
    """POST a streamed request and read its server-sent events as they arrive: (seconds since sent, event)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    out: list[tuple[float, dict | str]] = []
    while line := reply.readline():
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            out.append((time.perf_counter() - started, data if data == "[DONE]" else json.loads(data)))
            if data == "[DONE]":
                break
            if stop_after is not None and len(out) >= stop_after:
                conn.sock.close()  # the client goes away mid-answer
                break
    conn.close()
    return out


def test_tokens_stream_as_they_are_decoded_and_a_client_that_leaves_stops_its_row(served, rows):
    url, *_ = served
    body = chat("default/seqlora", rows[2], max_tokens=200, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    got = events(url, body)
    text = [(t, e["choices"][0]["delta"]["content"]) for t, e in got[1:]
            if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")]
    assert got[-1][1] == "[DONE]" and got[-2][1]["usage"]["completion_tokens"] == 200 and got[-2][1]["choices"] == []
    assert got[-3][1]["choices"][0]["finish_reason"] == "length" and got[-3][1]["model"] == "default/seqlora@v1"
    assert len(text) > 20 and text[0][0] < 0.5 * got[-1][0]  # the first words came long before the last
    plain = post(url, {**body, "stream": False, "stream_options": None})[1]
    assert "".join(d for _, d in text) == plain["choices"][0]["message"]["content"]
    before = stats(url)["total"]["tokens"]
    events(url, {**body, "max_tokens": 256}, stop_after=4)  # leaves after the first few tokens
    after = stats(url)["total"]["tokens"]
    assert after - before < 256  # the row stopped when its client left ...
    assert stats(url)["total"]["tokens"] == after  # ... and nothing is still generating


def test_text_only_turns_plain_completions_and_refused_options(served, rows):
    from openai import BadRequestError, OpenAI

    url, *_ = served
    client = OpenAI(base_url=f"{url}/v1", api_key=TOKEN)
    reply = client.chat.completions.create(model="default/seqlora", messages=[{"role": "user", "content": "Hello?"}],
                                           max_tokens=4, top_p=0.9)
    assert reply.model == "default/seqlora@v1" and reply.usage.completion_tokens >= 1
    done = client.completions.create(model="default/seqlora", prompt="red green blue", max_tokens=5,
                                     extra_body={"ignore_eos": True})
    assert done.object == "text_completion" and done.usage.completion_tokens == 5
    pieces = client.completions.create(model="default/seqlora", prompt="red green blue", max_tokens=5, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in pieces if c.choices) == done.choices[0].text
    row = rows[0]
    for extra, field in (({"stop": ["\n"]}, "stop"), ({"seed": 3, "temperature": 1.0}, "seed"),
                         ({"logprobs": True}, "logprobs"), ({"top_p": 0}, "top_p")):
        code, body = post(url, chat("default/seqlora", row, **extra))
        assert code == 400 and body["error"]["param"] == field, (extra, body)
    code, body = post(url, chat("default/auto", row, image_url=None) | {"messages": [{"role": "user", "content": "Hi"}]})
    assert code == 400 and "exactly one image" in body["error"]["message"]
    two = chat("default/seqlora", row)
    two["messages"][0]["content"].append(two["messages"][0]["content"][1])
    code, body = post(url, two)  # the built-in LLaVA takes one image per conversation here
    assert code == 400 and "one image per conversation" in body["error"]["message"]
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="default/seqlora", messages=[{"role": "assistant", "content": "x"}])
    try:
        urllib.request.urlopen(f"{url}/v1/stats", timeout=30)
        raise AssertionError("/v1/stats answered without the token")
    except urllib.error.HTTPError as e:
        assert e.code == 401


def test_a_picture_over_pils_own_pixel_limit_gets_413_not_cannot_decode(served, rows):
    url, *_ = served
    bomb = io.BytesIO()
    Image.new("1", (20000, 10000)).save(bomb, format="PNG")  # 200 Mpx: PIL refuses to open it at all
    code, body = post(url, chat("default/seqlora", rows[0], data_url(bomb.getvalue())))
    assert code == 413 and "pixel limit" in body["error"]["message"], body


def test_a_hot_adapter_uses_every_replica_and_replicas_preload_the_next_hot_one(served, rows):
    from ray import serve
    from serve_apps.openai_app import app

    url, _, args, _ = served
    serve.run(app({**args, "replicas": 2, "hot_window_s": 5.0}), name="strata", route_prefix="/")
    while len(stats(url)["replicas"]) != 2:  # the replaced replica's last report goes stale
        pass
    models = ["default/seqlora"] * 9 + ["default/colour"]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: post(url, chat(models[i % 10], rows[i % len(rows)]))[0], range(80)))
    assert codes == [200] * 80
    per = {r: s["requests"].get("default/seqlora@v1", 0) for r, s in stats(url)["replicas"].items()}
    assert len(per) == 2 and min(per.values()) >= 0.2 * sum(per.values()), per  # not pinned to one replica
    moving = threading.Event()

    def shape_traffic() -> None:
        while not moving.is_set():
            post(url, chat("default/shape", rows[0]))

    clients = [threading.Thread(target=shape_traffic) for _ in range(2)]  # traffic moves to shape ...
    for c in clients:
        c.start()
    try:
        deadline = time.monotonic() + 10  # ... and every replica holds it within 10 s
        while not all("default/shape@v1" in s["resident"] for s in stats(url)["replicas"].values()):
            assert time.monotonic() < deadline, stats(url)["replicas"]
    finally:
        moving.set()
        for c in clients:
            c.join()


def test_a_killed_replica_costs_under_one_percent_of_requests_and_no_wrong_answers(served, rows):
    import ray
    from ray import serve
    from serve_apps.openai_app import app

    url, _, args, _ = served
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


def test_the_console_refuses_to_scale_an_app_started_with_serve_run(served):
    from strata.console import serving
    from strata.console.config import ConsoleConfig

    url, _, _, dashboard = served
    cfg = ConsoleConfig(ray_dashboard=dashboard, serve_url=url)
    with pytest.raises(RuntimeError, match="started with serve.run"):  # Serve would restart every replica
        serving.scale(cfg, 3)
    with pytest.raises(RuntimeError, match="no Serve application 'nosuch'"):
        serving.scale(ConsoleConfig(ray_dashboard=dashboard, serve_url=url, serve_app="nosuch"), 3)
    assert serving.replica_states(cfg).get("RUNNING")  # Serve's state, read through the same dashboard API
