"""The console in headless Chromium (Debian's package, driven by Selenium) against a real `ray start` head:
the user's whole path in one test, then a wrong token, a refused sweep and a stopped job.

Screenshots of the main pages go to $STRATA_SCREENSHOTS when it is set (the README's come from here).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from console_client import LiveConsole
from ray_processes import RAY, free_port, start_head, stop_cluster

from strata.console.app import create_app
from strata.console.config import ConsoleConfig

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless Chromium is absent: "
                                "apt-get install chromium chromium-driver (.ci/run installs them)")
TOKEN = "console-token"
REPO = Path(__file__).parents[2]
SWEEP = {"name": "mini", "base": {"gate": {"mode": "report"}, "strategies": ["seqlora"], "tasks": 2, "n_train": 32,
                                 "n_val": 8, "n_test": 16, "adapter": {"visual_rank": 2, "text_rank": 2},
                                 "train": {"steps": 4, "batch_size": 8}},
         "space": {"train.lr": {"grid": [0.01, 0.0]}}, "metric": "faa", "mode": "max", "scheduler": "fifo",
         "cpus_per_trial": 1, "max_concurrent_trials": 1}


@pytest.fixture(scope="module")
def site(tmp_path_factory, backbone_dir):
    """A `ray start` head, the serving app deployed on it, a console with a token, and a browser."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from selenium import webdriver

    from strata.data.benchmark import write_benchmark

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    tmp = tmp_path_factory.mktemp("browser")
    dashboard, session = start_head(env, tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    files = write_benchmark(tmp / "data", 0, ("colour", "shape"), 64, 8, 40)
    (tmp / "spaces").mkdir()
    (tmp / "spaces" / "mini.yaml").write_text(yaml.safe_dump({**SWEEP, "base": {
        **SWEEP["base"], "backbone": {"source": str(backbone_dir)}}}))
    serve_port = free_port()
    cfg = ConsoleConfig(runs=tmp / "runs", registry=str(tmp / "runs" / "stream" / "registry"),
                        serve_url=f"http://127.0.0.1:{serve_port}", data_roots=(tmp / "data",),
                        tune_spaces=tmp / "spaces", ray_dashboard=dashboard, backbone=str(backbone_dir),
                        executor="local", token=TOKEN, repo=REPO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")  # this process's job and Serve clients
        config = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
        config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
        config["applications"][0]["args"].update(registry=cfg.registry, backbone=str(backbone_dir))
        config["applications"][0]["deployments"] = [{"name": "AdapterServer", "num_replicas": 1,
                                                     "ray_actor_options": {"num_cpus": 0.5}}]
        ServeSubmissionClient(dashboard).deploy_applications(config)  # what `serve deploy` sends
        live = LiveConsole(create_app(cfg))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
        browser.implicitly_wait(5)  # an element of a page still loading is waited for
        yield Site(browser, live.url, cfg, files, serve_port)
        browser.quit()
        live.stop()
    stop_cluster(session)


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
        from selenium.webdriver.support.expected_conditions import staleness_of
        from selenium.webdriver.support.ui import WebDriverWait

        page = self.b.find_element("tag name", "html")
        self.b.find_element("css selector", css).click()
        if confirm:
            self.b.switch_to.alert.accept()
        WebDriverWait(self.b, 120).until(staleness_of(page))

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

    def chat_model(self) -> str:
        """The version /v1/chat/completions answers `default/seqlora` with."""
        first = pq.read_table(self.files["colour"]).slice(0, 1).to_pylist()[0]
        image = "data:image/png;base64," + base64.b64encode(first["image"]).decode()
        body = {"model": "default/seqlora", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": first["prompt"]}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{self.serve_port}/v1/chat/completions",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())["model"]

    def shot(self, name: str) -> None:
        if where := os.environ.get("STRATA_SCREENSHOTS"):
            Path(where).mkdir(parents=True, exist_ok=True)
            self.b.save_screenshot(str(Path(where) / f"{name}.png"))


def test_the_users_path_from_sign_in_to_two_serving_replicas(site: Site):
    # 1. Open the console and sign in.
    site.open("/")
    assert "/signin" in site.b.current_url  # sent to sign in first
    site.sign_in(TOKEN)
    assert site.b.current_url.endswith("/streams") and "Streams" in site.text("h1")
    # 2. Launch two small arrivals.
    for task in ("colour", "shape"):
        job = site.launch("#arrival-form", "#launch-arrival", out="stream", stream="default", task=task,
                          dataset=str(site.files[task]), strategy="seqlora", steps="8", gate="report")
        assert site.job_ends(job) == "SUCCEEDED", site.text("#logs")[-3000:]
        assert f"task '{task}' arrives" in site.text("#logs")
    site.shot("job")
    # 3. Launch a small sweep, and watch its trials finish.
    job = site.launch("#sweep-form", "#launch-sweep", space="mini.yaml", out="tune")
    assert site.job_ends(job) == "SUCCEEDED", site.text("#logs")[-3000:]
    rows = site.b.find_elements("css selector", "#trials tr")[1:]
    assert len(rows) == 2 and all(r.find_elements("tag name", "td")[2].text == "2" for r in rows)  # both learned 2 tasks
    assert '"lr": 0.01' in site.text("#best")  # the best config: the trial that learned
    site.shot("sweep")
    # 4. Open the stream's matrix.
    site.open("/launch")
    site.shot("launch")
    site.open("/streams")
    site.click("a[href='/streams/stream/default']")
    cells = site.b.find_elements("css selector", "table.matrix[data-strategy=seqlora] td")
    assert len(cells) == 4 and all(c.text != "—" for c in cells[:1]), [c.text for c in cells]
    assert len(site.b.find_elements("css selector", "svg.curve")) == 2
    site.shot("stream")
    # 5. Promote a version and roll it back; the served answer follows each.
    assert site.until(site.chat_model, timeout=120, reload=False) == "default/seqlora@v2"
    site.open("/registry/default/seqlora")
    site.click("#promote-v1", confirm=True)
    assert "promoted v1" in site.text("#message") and site.text("#production") == "v1"
    assert site.chat_model() == "default/seqlora@v1"
    site.shot("registry")
    site.click("#rollback", confirm=True)
    assert site.text("#production") == "v2" and site.chat_model() == "default/seqlora@v2"
    # 6. Scale serving to two replicas.
    site.open("/serving")
    site.fill("form[action='/serving/scale']", replicas="2")
    site.click("#scale", confirm=True)
    assert "scaled to 2 replicas" in site.text("#message")
    site.until(lambda: site.text("#replicas") == "2" and "2 RUNNING" in site.text("#states"), timeout=180, every=2)
    assert "default/seqlora@v2" in site.text("#adapters")
    site.shot("serving")


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
    job = site.launch("#arrival-form", "#launch-arrival", out="long", stream="default", task="colour",
                      dataset=str(site.files["colour"]), strategy="seqlora", steps="100000")
    site.open(f"/jobs/{job}")
    site.click("#stop", confirm=True)
    assert site.job_ends(job, timeout=90) == "STOPPED"


def test_serving_scales_back_to_one_replica_from_the_page(site: Site):
    site.sign_in(TOKEN)
    site.open("/serving")
    site.fill("form[action='/serving/scale']", replicas="1")
    site.click("#scale", confirm=True)
    assert "scaled to 1 replicas" in site.text("#message")
    site.until(lambda: "1 RUNNING" in site.text("#states") and "STOPPING" not in site.text("#states"), timeout=120,
               every=2)
    assert site.chat_model() == "default/seqlora@v2"  # still answering
