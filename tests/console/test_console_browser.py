"""The console in headless Chromium (Debian's package, driven by Selenium) against a real `ray start` head,
mounted on the serving proxy as serve_apps/config.yaml deploys it: the user's whole path in one test,
then each action on its own, a wrong token and a refused sweep.

Screenshots of the main pages go to $STRATA_SCREENSHOTS when it is set (the README's come from here).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from lora_helper import served_registry
from ray_processes import RAY, free_port, start_head, stop_cluster

from strata.console.config import ConsoleConfig
from strata.coordinator import StreamState
from strata.registry import Ref, Registry

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless Chromium is absent: "
                                "apt-get install chromium chromium-driver (.ci/run installs them)")
TOKEN = "console-token"
REPO = Path(__file__).parents[2]
SWEEP = {"name": "mini", "base": {"gate": {"mode": "report"}, "strategies": ["seqlora"], "tasks": 2, "n_train": 32,
                                 "n_val": 8, "n_test": 16, "adapter": {"visual_rank": 2, "text_rank": 2},
                                 "train": {"steps": 12, "batch_size": 8}},
         "space": {"train.lr": {"grid": [0.01, 0.0]}}, "metric": "faa", "mode": "max", "scheduler": "asha",
         "grace_period": 1, "reduction_factor": 2, "cpus_per_trial": 1, "max_concurrent_trials": 1}


def sweep_file(tmp: Path, backbone_dir: Path, name: str, **options) -> None:
    """A 2-trial sweep over the learning rate; ASHA stops lr 0 (it learns nothing) after its first task."""
    base = {**SWEEP["base"], "backbone": {"source": str(backbone_dir)}}
    (tmp / "spaces" / f"{name}.yaml").write_text(yaml.safe_dump({**SWEEP, "name": name, "base": base, **options}))


@pytest.fixture(scope="module")
def site(tmp_path_factory, backbone_dir, test_spec):
    """A `ray start` head with serve_apps/config.yaml deployed on it (the serving app and the console,
    its token from the nodes' environment), a registry with default/seqlora v1 and v2, and a browser."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from selenium import webdriver

    from strata.data.benchmark import write_benchmark

    env = {**os.environ, "RAY_AUTH_MODE": "token", "STRATA_CONSOLE_TOKEN": TOKEN}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    tmp = tmp_path_factory.mktemp("browser")
    dashboard, session = start_head(env, tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    files = write_benchmark(tmp / "data", 0, ("colour", "shape"), 64, 8, 40)
    (tmp / "spaces").mkdir()
    sweep_file(tmp, backbone_dir, "mini")
    sweep_file(tmp, backbone_dir, "fifo", scheduler="fifo", max_concurrent_trials=2)
    reg = served_registry(tmp / "runs" / "stream", test_spec, backbone_dir)  # default/seqlora v1 (production), v2
    serve_port = free_port()
    cfg = ConsoleConfig(runs=tmp / "runs", registry=reg.uri, serve_url=f"http://127.0.0.1:{serve_port}",
                        data_roots=(tmp / "data",), tune_spaces=tmp / "spaces", ray_dashboard=dashboard,
                        backbone=str(backbone_dir), executor="local", repo=REPO)
    config = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
    serving, console = config["applications"]
    serving["args"].update(registry=cfg.registry, backbone=str(backbone_dir))
    serving["deployments"] = [{"name": "AdapterServer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}]
    console["args"].update(runs=str(cfg.runs), registry=cfg.registry, data_roots=[str(tmp / "data")],
                           tune_spaces=str(cfg.tune_spaces), ray_dashboard=dashboard, serve_url=cfg.serve_url,
                           backbone=cfg.backbone, executor=cfg.executor, repo=str(REPO))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")  # this process's Serve client
        ServeSubmissionClient(dashboard).deploy_applications(config)  # what `serve deploy` sends
        url = f"http://127.0.0.1:{serve_port}/console"
        wait_until_up(url)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
        browser.implicitly_wait(5)  # an element of a page still loading is waited for
        yield Site(browser, url, cfg, files, serve_port)
        browser.quit()
    stop_cluster(session)


def wait_until_up(url: str, timeout: float = 120) -> None:
    """Wait for the console's probe through the Serve proxy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"the console never answered at {url}"
        time.sleep(1)


class Site:
    """The browser on the console, with the steps a user takes."""

    def __init__(self, browser, url: str, cfg: ConsoleConfig, files: dict, serve_port: int) -> None:
        self.b, self.url, self.cfg, self.files, self.serve_port = browser, url, cfg, files, serve_port

    def open(self, path: str) -> None:
        self.b.get(self.url + path)

    def text(self, css: str) -> str:
        return self.b.find_element("css selector", css).text

    def fill(self, form: str, **fields: str) -> None:
        for name, value in fields.items():
            box = self.b.find_element("css selector", f"{form} [name={name}]")
            if box.tag_name == "select":
                self._select(box, value)
            else:
                box.clear()
                box.send_keys(value)

    @staticmethod
    def _select(box, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(box).select_by_value(value)

    def click(self, css: str, confirm: bool = False) -> None:
        """Click a link or a form's button (accepting its confirmation), and wait for the next page."""
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        page = self.b.find_element("tag name", "html")

        def gone(_) -> bool:
            try:
                page.is_enabled()
            except StaleElementReferenceException:
                return True
            except WebDriverException as e:  # Chromium may say so this way while the next page replaces it
                if "does not belong to the document" in str(e):
                    return True
                raise
            return False

        self.b.find_element("css selector", css).click()
        if confirm:
            self.b.switch_to.alert.accept()
        WebDriverWait(self.b, 120).until(gone)

    def click_and_cancel(self, css: str) -> str:
        """Click a button that asks for confirmation, and say no; the question asked."""
        self.b.find_element("css selector", css).click()
        alert = self.b.switch_to.alert
        question = alert.text
        alert.dismiss()
        return question

    def until(self, check, timeout: float = 240, every: float = 1.0, reload: bool = True):
        """Poll (reloading the page) until `check()` is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            assert time.monotonic() < deadline, f"timed out on {self.b.current_url}:\n{self.b.page_source[-3000:]}"
            time.sleep(every)
            if reload:
                self.b.refresh()
        return value

    def sign_in(self, token: str) -> None:
        self.open("/signin")
        self.fill("form", token=token)
        self.click("#signin")

    def launch(self, form: str, button: str, **fields: str) -> str:
        """Submit a launch form (again while Ray's job agent is not up: the page says 503); the job id."""
        for _ in range(30):
            self.open("/launch")
            self.fill(form, **fields)
            self.click(button)
            if "/jobs/" in self.b.current_url:
                return self.b.current_url.rsplit("/", 1)[1]
            assert "did not take the job" in self.b.page_source, self.b.page_source[-2000:]
            time.sleep(3)
        raise AssertionError("Ray's job agent never took the job")

    def job_ends(self, job: str, timeout: float = 300) -> str:
        self.open(f"/jobs/{job}")
        status = self.until(lambda: (s := self.b.find_element("id", "status").get_attribute("data-status"))
                            in ("SUCCEEDED", "FAILED", "STOPPED") and s, timeout)
        return status

    def chat_model(self, model: str = "walk/seqlora") -> str:
        """The version /v1/chat/completions answers `model` with."""
        first = pq.read_table(self.files["colour"]).slice(0, 1).to_pylist()[0]
        image = "data:image/png;base64," + base64.b64encode(first["image"]).decode()
        body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": first["prompt"]}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{self.serve_port}/v1/chat/completions",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())["model"]

    @contextlib.contextmanager
    def traffic(self):
        """Chat requests one after another while the block runs; yields their outcomes (model or error)."""
        outcomes: list[str] = []
        done = threading.Event()

        def send() -> None:
            while not done.is_set():
                try:
                    outcomes.append(self.chat_model())
                except (urllib.error.URLError, OSError) as e:
                    outcomes.append(f"failed: {e}")

        sender = threading.Thread(target=send)
        sender.start()
        try:
            yield outcomes
        finally:
            done.set()
            sender.join(timeout=150)

    def shot(self, name: str) -> None:
        if where := os.environ.get("STRATA_SCREENSHOTS"):
            Path(where).mkdir(parents=True, exist_ok=True)
            self.b.save_screenshot(str(Path(where) / f"{name}.png"))


def test_the_users_path_from_sign_in_to_two_serving_replicas(site: Site):
    # 1. Open the console (on the serving proxy, under /console) and sign in.
    site.open("/")
    assert "/console/signin" in site.b.current_url  # sent to sign in first
    site.sign_in(TOKEN)
    assert site.b.current_url.endswith("/console/streams") and "Streams" in site.text("h1")
    # 2. Launch two small arrivals.
    for task in ("colour", "shape"):
        job = site.launch("#arrival-form", "#launch-arrival", out="stream", stream="walk", task=task,
                          dataset=str(site.files[task]), strategy="seqlora", steps="8", gate="report")
        assert site.job_ends(job) == "SUCCEEDED", site.text("#logs")[-3000:]
        assert f"task '{task}' arrives" in site.text("#logs")
    # 3. Launch a small sweep, and watch its trials finish.
    job = site.launch("#sweep-form", "#launch-sweep", space="mini.yaml", out="tune")
    assert site.job_ends(job) == "SUCCEEDED", site.text("#logs")[-3000:]
    states = sorted((t["state"], t["tasks"]) for t in trial_states(site))
    assert states == [("finished", "2 / 2"), ("stopped early", "1 / 2")], states  # ASHA stopped one
    assert '"lr": 0.01' in site.text("#best")  # the best config: the trial that learned
    site.shot("sweep")
    # 4. Open the stream's matrix.
    site.open("/launch")
    site.shot("launch")
    site.open("/streams")
    site.click("a[href$='/streams/stream/walk']")
    cells = site.b.find_elements("css selector", "table.matrix[data-strategy=seqlora] td")
    assert len(cells) == 4 and all(c.text != "—" for c in cells[:1]), [c.text for c in cells]
    assert len(site.b.find_elements("css selector", "svg.curve")) == 2
    # 5. Promote a version and roll it back; the served answer follows each.
    assert site.until(site.chat_model, timeout=120, reload=False) == "walk/seqlora@v2"
    site.open("/registry/walk/seqlora")
    site.click("#promote-v1", confirm=True)
    assert "promoted v1" in site.text("#message") and site.text("#production") == "v1"
    assert site.chat_model() == "walk/seqlora@v1"
    site.shot("registry")
    site.click("#rollback", confirm=True)
    assert site.text("#production") == "v2" and site.chat_model() == "walk/seqlora@v2"
    # 6. Scale serving to two replicas.
    site.open("/serving")
    with site.traffic() as answers:  # no request fails while Serve adds the replica
        site.fill("form[action$='/serving/scale']", replicas="2")
        site.click("#scale", confirm=True)
        assert "scaled to 2 replicas" in site.text("#message")
        site.until(lambda: site.text("#replicas") == "2" and "2 RUNNING" in site.text("#states"), timeout=180,
                   every=2)
    assert answers and set(answers) == {"walk/seqlora@v2"}, answers
    assert "walk/seqlora@v2" in site.text("#adapters")
    site.shot("serving")


def trial_states(site: Site) -> list[dict]:
    """The job page's trials: config, state and tasks done."""
    rows = [r.find_elements("tag name", "td") for r in site.b.find_elements("css selector", "#trials tr[data-trial]")]
    return [{"config": json.loads(r[2].text), "state": r[1].text, "tasks": r[3].text} for r in rows]


def test_signing_in_returns_to_the_page_asked_for(site: Site):
    site.b.delete_all_cookies()
    site.open("/registry/default/seqlora")
    assert "/console/signin?next=/registry/default/seqlora" in site.b.current_url
    site.fill("form", token=TOKEN)
    site.click("#signin")
    assert site.b.current_url.endswith("/console/registry/default/seqlora") and site.text("#production")


def test_a_wrong_token_gets_401_and_no_session(site: Site):
    site.b.delete_all_cookies()
    site.sign_in("not-the-token")
    assert "wrong token" in site.text("#message")
    site.open("/registry")
    assert "/signin" in site.b.current_url
    try:
        urllib.request.urlopen(urllib.request.Request(f"{site.url}/serving/stats"), timeout=30)
        raise AssertionError("an anonymous request was answered")
    except urllib.error.HTTPError as e:
        assert e.code == 401


def test_an_arrival_launched_from_the_page_trains_and_its_stream_shows_it(site: Site):
    site.sign_in(TOKEN)
    job = site.launch("#arrival-form", "#launch-arrival", out="solo", stream="solo", task="colour",
                      dataset=str(site.files["colour"]), strategy="seqlora", steps="8", gate="report")
    assert site.job_ends(job) == "SUCCEEDED", site.text("#logs")[-3000:]
    site.click("a[href$='/streams/solo/solo']")
    assert site.text("table.timeline td:nth-child(1)") == "colour"
    assert site.text("table.timeline .badge") in ("promoted", "rejected")  # the gate only reports here
    (cell,) = site.b.find_elements("css selector", "table.matrix[data-strategy=seqlora] td")
    assert float(cell.text) >= 0


def test_a_sweep_with_options_from_the_form_shows_each_trials_state_live_and_its_best_config(site: Site):
    site.sign_in(TOKEN)
    # The file says FIFO, two at once; the form asks for ASHA, one at a time, and ASHA then stops lr 0.
    job = site.launch("#sweep-form", "#launch-sweep", space="fifo.yaml", out="tune", scheduler="asha",
                      max_concurrent_trials="1")

    def in_progress() -> str | None:
        if any(t["state"] in ("running", "pending") for t in trial_states(site)):
            return "a trial in progress"
        return "the job ended first" if site.text("#status") not in ("PENDING", "RUNNING") else None

    assert site.until(in_progress, timeout=180) == "a trial in progress"  # seen live, the page reloading itself
    assert site.job_ends(job) == "SUCCEEDED", site.text("#logs")[-3000:]
    assert "--scheduler asha --max-concurrent-trials 1" in site.b.page_source  # the job's command line
    states = {t["config"]["train.lr"]: (t["state"], t["tasks"]) for t in trial_states(site)}
    assert states == {0.01: ("finished", "2 / 2"), 0.0: ("stopped early", "1 / 2")}, states  # ASHA stopped lr 0
    assert '"lr": 0.01' in site.text("#best")


def test_the_matrix_fills_in_while_a_task_trains_without_a_reload(site: Site):
    state = StreamState("live", str(site.cfg.runs / "live" / "coordinator"))
    state.begin_task("decoupled", "colour", "me")
    state.commit_task("decoupled", "colour", "me", "promoted", {"adapter": {"name": "colour", "version": 1},
                                                               "accuracy": {"colour": 91.0}})
    state.begin_task("decoupled", "shape", "me")
    site.sign_in(TOKEN)
    site.open("/streams/live/live")
    assert "in progress" in site.text("#strategy-decoupled h2")
    site.b.execute_script("window.notReloaded = true")
    state.set_status("decoupled", "shape", "me", "evaluated", accuracy={"colour": 90.0, "shape": 85.0})
    state.commit_task("decoupled", "shape", "me", "promoted", {"adapter": {"name": "shape", "version": 1},
                                                              "accuracy": {"colour": 90.0, "shape": 85.0}})
    cells = site.until(lambda: [c.text for c in site.b.find_elements("css selector", "table.matrix td")] == [
        "91.0", "—", "90.0", "85.0"], timeout=30, reload=False)
    assert cells and site.b.execute_script("return window.notReloaded") is True  # the page polled, not reloaded
    assert "in progress" not in site.text("#strategy-decoupled h2")


def test_promote_asks_first_and_the_next_request_gets_the_promoted_version(site: Site):
    Registry(site.cfg.registry).promote(Ref("default", "seqlora", 1))
    site.sign_in(TOKEN)
    site.open("/registry/default/seqlora")
    assert "Serve default/seqlora@v2" in site.click_and_cancel("#promote-v2")
    site.b.refresh()
    assert site.text("#production") == "v1" and site.chat_model("default/seqlora") == "default/seqlora@v1"
    site.click("#promote-v2", confirm=True)
    assert "promoted v2" in site.text("#message") and site.text("#production") == "v2"
    assert site.chat_model("default/seqlora") == "default/seqlora@v2"


def test_roll_back_asks_first_and_the_next_request_gets_the_previous_version(site: Site):
    reg = Registry(site.cfg.registry)
    reg.promote(Ref("default", "seqlora", 1))
    reg.promote(Ref("default", "seqlora", 2))
    site.sign_in(TOKEN)
    site.open("/registry/default/seqlora")
    assert "Roll default/seqlora back" in site.click_and_cancel("#rollback")
    assert site.text("#production") == "v2"
    site.click("#rollback", confirm=True)
    assert "rolled back v2 to v1" in site.text("#message") and site.text("#production") == "v1"
    assert site.chat_model("default/seqlora") == "default/seqlora@v1"


def test_a_refused_sweep_leaves_the_job_list_unchanged_and_a_running_job_stops(site: Site):
    site.sign_in(TOKEN)
    site.open("/launch")
    before = len(site.b.find_elements("css selector", "#jobs tr"))
    (Path(site.cfg.tune_spaces) / "broken.yaml").write_text("name: broken\nspace: {}\nmetric: accuracy\n")
    site.open("/launch")
    site.fill("#sweep-form", space="broken.yaml", out="tune")
    site.click("#launch-sweep")
    assert "not launched" in site.text("#message") and "sweep metric must be one of" in site.text("#message")
    site.open("/launch")
    assert len(site.b.find_elements("css selector", "#jobs tr")) == before
    site.open("/jobs/raysubmit_nosuch")
    assert "no job 'raysubmit_nosuch'" in site.text("#message")
    job = site.launch("#arrival-form", "#launch-arrival", out="long", stream="default", task="colour",
                      dataset=str(site.files["colour"]), strategy="seqlora", steps="100000")
    site.open(f"/jobs/{job}")
    site.click("#stop", confirm=True)
    assert site.job_ends(job, timeout=90) == "STOPPED"


def test_serving_scales_back_to_one_replica_from_the_page(site: Site):
    site.sign_in(TOKEN)
    site.open("/serving")
    with site.traffic() as answers:  # no request fails while Serve drains and stops a replica
        site.fill("form[action$='/serving/scale']", replicas="1")
        site.click("#scale", confirm=True)
        assert "scaled to 1 replicas" in site.text("#message")
        site.until(lambda: "1 RUNNING" in site.text("#states") and "STOPPING" not in site.text("#states"),
                   timeout=120, every=2)
    assert answers and set(answers) == {"walk/seqlora@v2"}, answers
