"""The MLflow UI, in a real browser: the smoke pipeline's experiment opens as model training and
its runs table lists the stages (headless Chromium driven by Selenium)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from pseudolabel import tracking

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(pipeline, tracking_uri, tmp_path_factory):
    """`mlflow ui` on the test store, on a free port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("wb"),  # a file: a pipe nobody reads would fill and stall the server
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "mlflow ui: no /health in 120 s"
                time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (dev extra)")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        pytest.skip(
            "chromium / chromium-driver not installed: `make test` installs them as root "
            "(scripts/ensure-test-services.sh), else apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1600,1000")
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_runs_table_shows_the_pipeline_stages(ui, browser, smoke_cfg, tracking_uri, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(smoke_cfg.tracking.experiment)
    assert experiment.tags[tracking.KIND_TAG] == tracking.MODEL_TRAINING
    # MLflow 3.17's UI picks GenAI or model training per browser (its toggle, or this URL
    # parameter); the experiment tag above is what builds without the toggle read.
    browser.get(f"{ui}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
    stages = ("train_teacher", "train_student", "evaluate")

    def shown(driver):
        text = driver.find_element("tag name", "body").text
        return "/runs" in driver.current_url and all(stage in text for stage in stages)

    try:
        WebDriverWait(browser, 120, poll_frequency=2).until(shown)
    except Exception:
        body = browser.find_element("tag name", "body").text
        pytest.fail(f"the runs table did not list {stages}; the page shows:\n{body[:2000]}")
    # What a user sees; UI_SCREENSHOT=docs/figures/mlflow_ui.png refreshes the README's picture.
    assert browser.save_screenshot(os.environ.get("UI_SCREENSHOT") or str(tmp_path / "ui.png"))
