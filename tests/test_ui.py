"""What a user sees in a real browser (headless Chromium driven by Selenium), on the smoke
pipeline's runs: MLflow's UI opens the experiment as model training with the stages in its runs
table, compares teacher and student test accuracy side by side, and shows the confidence
histogram among the pseudo_label run's artifacts; `dvc plots show`'s page draws every plot."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from pseudolabel import tracking
from pseudolabel.models import io as model_io
from tests.conftest import REPO, free_port, wait_until_answers

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HISTOGRAM = "plots/confidence.png"  # the pseudo_label run's confidence histogram (stages/label.py)


@pytest.fixture(scope="module")
def ui(pipeline, tracking_uri, tmp_path_factory):
    """`mlflow ui` on the test store, on a free port."""
    port = free_port()
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
        wait_until_answers(url + "/health", proc, lambda: log.read_text(errors="replace"))
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
    # No calls home: on a closed network they only fail, and cost time on a loaded machine.
    for arg in ("--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument("--window-size=1600,1000")
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(browser, condition, what: str, seconds: float = 120):
    """condition(browser)'s first truthy value; on a timeout, fail with what the page shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, seconds, poll_frequency=1).until(condition)
    except Exception:
        body = browser.find_element("tag name", "body").text
        pytest.fail(f"{what}; the page shows:\n{body[:2000]}")


@pytest.fixture(scope="module")
def experiment(pipeline, smoke_cfg, tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.get_experiment_by_name(smoke_cfg.tracking.experiment)


def test_the_runs_table_shows_the_pipeline_stages(ui, browser, experiment, tmp_path):
    assert experiment.tags[tracking.KIND_TAG] == tracking.MODEL_TRAINING
    # MLflow 3.17's UI picks GenAI or model training per browser (its toggle, or this URL
    # parameter); the experiment tag above is what builds without the toggle read.
    browser.get(f"{ui}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
    stages = ("train_teacher", "train_student", "evaluate")

    def shown(driver):
        text = driver.find_element("tag name", "body").text
        return "/runs" in driver.current_url and all(stage in text for stage in stages)

    _wait(browser, shown, f"the runs table did not list {stages}")
    # What a user sees; UI_SCREENSHOT=docs/figures/mlflow_ui.png refreshes the README's picture.
    assert browser.save_screenshot(os.environ.get("UI_SCREENSHOT") or str(tmp_path / "ui.png"))


# The compare view's metrics: one grid of names, then one of values, row by row, a column per run.
METRIC_ROW = """
const name = arguments[0];
const grids = [...document.querySelectorAll('[role="grid"]')];
const names = grids.find(g => [...g.querySelectorAll("a")].some(a => a.textContent.trim() == name));
if (!names || grids.indexOf(names) + 1 >= grids.length) return null;
const rows = [...names.querySelector('[role="rowgroup"]').children];
const row = rows.findIndex(r => r.textContent.trim() === name);
const cells = [...grids[grids.indexOf(names) + 1].querySelector('[role="rowgroup"]').children];
const perRow = cells.length / rows.length;
return cells.slice(row * perRow, (row + 1) * perRow).map(c => c.innerText.trim());
"""


def test_the_compare_view_shows_teacher_and_student_test_accuracy_side_by_side(
    ui, browser, experiment, pipeline
):
    client = mlflow.MlflowClient()
    runs = [
        client.get_run(model_io.read_meta(pipeline.model(role)).run_id)
        for role in ("teacher", "student")
    ]
    assert [run.data.tags["stage"] for run in runs] == ["train_teacher", "train_student"]
    ids = json.dumps([run.info.run_id for run in runs], separators=(",", ":"))
    browser.get(f'{ui}/#/compare-runs?runs={ids}&experiments=["{experiment.experiment_id}"]')
    shown = _wait(
        browser,
        lambda driver: driver.execute_script(METRIC_ROW, "test_accuracy"),
        "the compare view has no test_accuracy row",
    )
    assert "Comparing 2 Runs" in browser.find_element("tag name", "body").text
    # The UI rounds to 3 decimals; the columns are the runs in the URL's order.
    assert [float(value) for value in shown] == pytest.approx(
        [run.data.metrics["test_accuracy"] for run in runs], abs=5e-4
    )


def test_the_confidence_histogram_renders_in_the_pseudo_label_runs_artifacts(
    ui, browser, experiment, pipeline
):
    (run,) = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id],
        f"tags.stage = 'pseudo_label' and tags.{tracking.CSV_TAG} = '{tracking.md5(pipeline.csv)}'",
        max_results=1,
    )
    browser.get(
        f"{ui}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        f"/artifacts/{HISTOGRAM}"
    )
    # The preview's <img> once the browser has decoded the PNG the server sent.
    size = _wait(
        browser,
        lambda driver: driver.execute_script(
            "const img = [...document.images].find(i => i.alt === arguments[0]);"
            "return img && img.complete && img.naturalWidth > 0"
            " ? [img.naturalWidth, img.naturalHeight] : null;",
            HISTOGRAM,
        ),
        f"{HISTOGRAM} did not render in the run's artifacts",
    )
    with Image.open(pipeline.outputs / HISTOGRAM) as logged:
        assert tuple(size) == logged.size


# Each plot DVC's page draws: vega-embed's <svg> and at least one mark drawn from the data.
RENDERED_PLOTS = """
return [...document.querySelectorAll("body > div[id]")].map(div => [
    div.id,
    div.querySelector("svg.marks") !== null
        && [...div.querySelectorAll("g.role-mark path")].some(p => p.getAttribute("d")),
]);
"""


def test_dvc_plots_show_draws_the_pipelines_plots(browser, pipeline, tmp_path):
    """`dvc plots show` on the smoke run's plot files with the project's dvc.yaml, through the
    offline template (`make plots`): DVC's default page loads Vega from a CDN."""
    project = tmp_path / "project"
    shutil.copytree(pipeline.plots, project / "plots")
    shutil.copy2(REPO / "dvc.yaml", project / "dvc.yaml")
    # The smoke run's own settings (one round): the default's round@round2 plots would be
    # files this run never wrote.
    subprocess.run(
        [
            str(BIN / "pseudolabel"),
            "compose",
            "-o",
            str(project / "params.yaml"),
            "+experiment=smoke",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    template = tmp_path / "template.html"
    for cmd in (
        [str(BIN / "dvc"), "init", "--no-scm", "-q"],
        [sys.executable, str(REPO / "scripts" / "plots-template.py"), str(template)],
        [str(BIN / "dvc"), "plots", "show", "--html-template", str(template), "-o", "out"],
    ):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True, timeout=300)
    page = project / "out" / "index.html"
    assert "<script src" not in page.read_text()  # nothing to fetch: it renders offline
    browser.get(page.as_uri())
    plots = dict(
        _wait(
            browser,
            lambda driver: (
                (shown := driver.execute_script(RENDERED_PLOTS))
                and all(drawn for _, drawn in shown)
                and shown
            ),
            "dvc plots show's page did not draw every plot",
            seconds=60,
        )
    )
    # dvc.yaml's two top-level plots and the stages' own (learning curves, confusion matrices).
    assert {"val_accuracy_by_epoch", "threshold_analysis"} <= set(plots)
    assert {"plots_train_student_csv", "plots_evaluate_student_confusion_csv"} <= set(plots)
