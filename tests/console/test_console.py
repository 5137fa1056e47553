"""The console over real HTTP: sign-in and CSRF, the stream page from a coordinator's state, the registry's
promote / roll back / diff, and launches refused before any job exists. Ray jobs: test_console_jobs.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from console_client import LiveConsole
from lora_helper import served_registry
from starlette.applications import Starlette
from starlette.routing import Mount

from strata.console.app import create_app
from strata.console.config import ConsoleConfig
from strata.coordinator import StreamState
from strata.registry import Ref
from strata.tracking import write_curve

TOKEN = "s3cret-console"


@pytest.fixture(scope="module")
def site(tmp_path_factory, test_spec, backbone_dir):
    """A console with a token over one stream in progress and a registry with two seqlora versions."""
    tmp = tmp_path_factory.mktemp("console")
    reg = served_registry(tmp, test_spec, backbone_dir)
    state = StreamState("default", str(tmp / "runs" / "q1" / "coordinator"))
    for i, task in enumerate(("colour", "shape")):
        state.begin_task("decoupled", task, "me")
        state.set_status("decoupled", task, "me", "evaluated", accuracy={"colour": 97.5 - i, "shape": 12.0 + 80 * i})
        state.commit_task("decoupled", task, "me", "promoted",
                          {"adapter": {"name": task, "version": 1}, "accuracy": {"colour": 97.5 - i, "shape": 12.0 + 80 * i}})
    state.begin_task("decoupled", "count", "me")  # the third task is training
    write_curve(tmp / "runs" / "q1" / "decoupled" / "tensorboard", "colour", [[1, 2.0, None], [2, 0.5, 0.4]])
    (tmp / "data").mkdir()
    cfg = ConsoleConfig(runs=tmp / "runs", registry=reg.uri, data_roots=(tmp / "data",), token=TOKEN,
                        tune_spaces=Path(__file__).parents[2] / "tune_spaces", ray_dashboard="http://127.0.0.1:9",
                        serve_url="http://127.0.0.1:9")  # nothing listens on port 9: no Ray, no serving
    live = LiveConsole(create_app(cfg))
    yield live, reg, tmp, cfg
    live.stop()


def test_every_page_needs_a_session_and_a_wrong_token_gets_401(site):
    live, _, _, _ = site
    anonymous = live.browser()
    assert anonymous.get("/health").status == 200  # probes stay open
    page = anonymous.get("/registry")
    assert page.status == 303 and page.headers["location"] == "/signin?next=/registry"
    assert anonymous.get("/serving/stats", html=False).status == 401
    wrong = anonymous.sign_in("nope")
    assert wrong.status == 401 and "wrong token" in wrong.text
    assert anonymous.get("/streams").status == 303  # still signed out
    assert anonymous.get("/streams", html=False, Authorization=f"Bearer {TOKEN}").status == 200  # scripts
    signed = live.browser()
    assert signed.sign_in(TOKEN).status == 303
    for elsewhere in ("//evil.example/x", "/\\evil.example", "https://evil.example"):  # no open redirect
        reply = signed.post("/signin", {"token": TOKEN, "next": elsewhere})
        assert reply.status == 303 and reply.headers["location"] == "/streams", (elsewhere, reply.headers)
    assert signed.get("/streams").status == 200


def test_a_post_without_the_session_csrf_token_changes_nothing(site):
    live, reg, _, _ = site
    user = live.browser()
    user.sign_in(TOKEN)
    other = live.browser()
    other.sign_in(TOKEN)
    for form in ({"version": "2"}, {"version": "2", "csrf": "0" * 64}, {"version": "2", "csrf": other.csrf()}):
        reply = user.post("/registry/default/seqlora/promote", form)
        assert reply.status == 403 and "CSRF" in reply.text
    assert reg.production("default", "seqlora") == 1


def test_the_stream_page_shows_the_timeline_matrix_metrics_and_curves_and_polls_while_training(site):
    live, _, _, _ = site
    user = live.browser()
    user.sign_in(TOKEN)
    page = user.get("/streams")
    assert 'href="/streams/q1/default"' in page.text
    page = user.get("/streams/q1/default").text
    assert page.count('class="badge promoted"') == 2 and 'class="badge training"' in page
    assert "97.5" in page and "92.0" in page  # the matrix: colour after task 1, shape after task 2
    assert 'data-running="true"' in page and 'data-src="/streams/q1/default/live"' in page
    assert 'class="curve" data-task="colour"' in page and "loss 2.000 → 0.500 over 2 steps" in page
    assert user.get("/streams/q1/..%2F..%2Fetc").status in (400, 404)
    assert user.get("/streams/q1/nostream").status == 404


def test_promote_and_roll_back_from_the_page_use_the_registry_and_diff_compares_versions(site):
    live, reg, _, _ = site
    user = live.browser()
    user.sign_in(TOKEN)
    page = user.get("/registry/default/seqlora").text
    assert 'id="promote-v2"' in page and "confirm(" in page
    csrf = user.csrf("/registry/default/seqlora")
    reply = user.post("/registry/default/seqlora/promote", {"version": "2", "csrf": csrf})
    assert reply.status == 303 and reg.production("default", "seqlora") == 2
    card = reg.card(Ref("default", "seqlora", 2))
    assert card["history"][-1]["reason"] == "promoted by hand from the console"
    assert "promoted v2" in user.get(reply.headers["location"]).text
    reply = user.post("/registry/default/seqlora/rollback", {"csrf": csrf})
    assert reply.status == 303 and reg.production("default", "seqlora") == 1
    diff = user.get("/registry/default/seqlora/diff?a=1&b=2")
    assert diff.status == 200 and "stage" in diff.text
    assert user.get("/registry/default/seqlora/diff?a=1&b=9").status == 404
    assert user.post("/registry/default/seqlora/promote", {"version": "9", "csrf": csrf}).status == 400
    assert user.get("/registry/default/nosuch").status == 404
    assert user.get("/registry/default/bad..name").status == 400


def test_a_launch_with_bad_input_is_refused_with_its_reason_before_any_job(site):
    """The Ray dashboard address here is unreachable: a refused launch never gets that far."""
    live, _, tmp, _ = site
    user = live.browser()
    user.sign_in(TOKEN)
    csrf = user.csrf("/launch")
    outside = tmp / "elsewhere.parquet"
    outside.write_bytes(b"not parquet")
    (tmp / "data" / "broken.parquet").write_bytes(b"not parquet")
    base = {"csrf": csrf, "out": "stream", "stream": "default", "task": "colour", "strategy": "decoupled"}
    for form, reason in (
        ({**base, "dataset": str(tmp / "data" / "missing.parquet")}, "does not exist"),
        ({**base, "dataset": str(outside)}, "outside the console&#39;s data roots"),
        ({**base, "dataset": str(tmp / "data" / "broken.parquet")}, "is invalid"),
        ({**base, "dataset": str(tmp / "data" / "missing.parquet"), "strategy": "nosuch"}, "unknown strategy"),
        ({**base, "dataset": "x", "task": "../etc"}, "invalid task name"),
    ):
        reply = user.post("/launch/arrival", form)
        assert reply.status == 400 and "not launched" in reply.text and reason in reply.text, (reason, reply.text[-600:])
    reply = user.post("/launch/sweep", {"csrf": csrf, "space": "nosuch.yaml", "out": "tune"})
    assert reply.status == 400 and "no sweep file" in reply.text
    reply = user.post("/launch/sweep", {"csrf": csrf, "space": "../Makefile", "out": "tune"})
    assert reply.status == 400
    reply = user.post("/launch/sweep", {"csrf": csrf, "space": "smoke.yaml", "out": "tune", "num_samples": "0"})
    assert reply.status == 400 and "num_samples must be &gt;= 1" in reply.text, reply.text[-600:]


def test_sessions_are_signed_survive_a_restart_and_expire_and_signing_out_holds_everywhere(monkeypatch,
                                                                                           tmp_path) -> None:
    from strata.console import auth

    sessions = auth.Sessions("t", tmp_path / auth.SIGNED_OUT)
    assert sessions.sign_in("wrong") is None
    sid = sessions.sign_in("t")
    restarted, other = auth.Sessions("t"), auth.Sessions("another token")
    assert restarted.valid(sid) and restarted.csrf_ok(sid, sessions.csrf(sid))  # same token: still signed in
    assert not other.valid(sid) and not other.csrf_ok(sid, sessions.csrf(sid))  # a new token signs everyone out
    expiry, nonce, mac = sid.split(".")
    for forged in (f"{int(expiry) + 1}.{nonce}.{mac}", f"{expiry}.x{nonce}.{mac}", "", "a.b", "1.2.3"):
        assert not sessions.valid(forged), forged
    second = sessions.sign_in("t")
    assert not sessions.csrf_ok(second, sessions.csrf(sid))  # a CSRF token is its own session's only
    replica = auth.Sessions("t", tmp_path / auth.SIGNED_OUT)  # another replica, or the console restarted
    assert replica.valid(sid)
    sessions.sign_out(sid)
    assert not sessions.valid(sid) and sessions.valid(second)
    assert not replica.valid(sid) and replica.valid(second)  # it reads the shared file
    assert not auth.Sessions("t", tmp_path / auth.SIGNED_OUT).valid(sid)
    monkeypatch.setattr(auth.time, "time", lambda: int(expiry) + 1)
    assert not sessions.valid(second)  # expired


def test_without_ray_or_serving_the_pages_say_so_and_actions_are_refused_with_the_reason(site):
    live, _, _, _ = site
    user = live.browser()
    user.sign_in(TOKEN)
    page = user.get("/serving")
    assert page.status == 200 and "no serving at http://127.0.0.1:9" in page.text
    assert "cannot reach the Ray dashboard" in user.get("/launch").text  # the forms are still there
    csrf = user.csrf("/serving")
    for replicas, status, reason in (("abc", 400, "invalid literal"), ("0", 400, "between 1 and 64"),
                                     ("2", 409, "cannot read Serve&#39;s state")):
        reply = user.post("/serving/scale", {"csrf": csrf, "replicas": replicas})
        assert reply.status == status and "not scaled" in reply.text and reason in reply.text, reply.text[-800:]
    reply = user.get("/jobs/raysubmit_nosuch")
    assert reply.status == 503 and "cannot reach the Ray dashboard at http://127.0.0.1:9" in reply.text, reply.text[-800:]



def test_under_a_path_prefix_every_link_redirect_and_cookie_carries_it(site):
    _, reg, _, cfg = site
    # Mounted under /console, as Serve's route prefix (or a proxy with `strata console --root-path`) does.
    live = LiveConsole(Starlette(routes=[Mount("/console", app=create_app(cfg))]))
    try:
        user = live.browser()
        user.base += "/console"
        assert user.get("/registry").headers["location"] == "/console/signin?next=/registry"
        signed = user.sign_in(TOKEN)
        assert signed.headers["location"] == "/console/streams" and "Path=/console" in signed.headers["set-cookie"]
        page = user.get("/registry/default/seqlora")
        links = re.findall(r'(?:href|action|data-src)="(/[^"]*)"', page.text)
        assert links and all(link.startswith("/console/") for link in links), links
        before = reg.production("default", "seqlora")
        other = 3 - before  # v1 or v2
        reply = user.post("/registry/default/seqlora/promote", {"csrf": user.csrf("/registry"), "version": str(other)})
        assert reply.status == 303 and reply.headers["location"].startswith("/console/registry/default/seqlora?done=")
        assert reg.production("default", "seqlora") == other
        reply = user.post("/registry/default/seqlora/rollback", {"csrf": user.csrf("/registry")})
        assert reply.status == 303 and reg.production("default", "seqlora") == before
    finally:
        live.stop()


def test_the_serve_console_without_a_token_is_locked_but_answers_probes() -> None:
    from serve_apps.console_app import LOCKED, locked

    live = LiveConsole(locked())
    try:
        anonymous = live.browser()
        assert anonymous.get("/health").status == 200 and anonymous.get("/ready").status == 200
        for reply in (anonymous.get("/streams"), anonymous.post("/serving/scale", {"replicas": "2"})):
            assert reply.status == 503 and LOCKED in reply.text
    finally:
        live.stop()


def test_a_signed_out_session_is_refused_by_this_console_and_by_a_restarted_one(site):
    live, _, _, cfg = site
    user = live.browser()
    user.sign_in(TOKEN)
    (cookie,) = [c.value for c in user.jar if c.name == "strata_console"]
    reply = user.post("/signout", {"csrf": user.csrf("/streams")})
    assert reply.status == 303 and reply.headers["location"] == "/signin"
    thief = live.browser()  # a copy of the cookie, kept after the sign-out
    assert thief.get("/streams", Cookie=f"strata_console={cookie}").status == 303
    restarted = LiveConsole(create_app(cfg))
    try:
        assert restarted.browser().get("/streams", Cookie=f"strata_console={cookie}").status == 303
        fresh = restarted.browser()
        fresh.sign_in(TOKEN)
        assert fresh.get("/streams").status == 200
    finally:
        restarted.stop()
