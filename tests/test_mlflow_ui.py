"""Browser test: a real ``mlflow server``, a sweep's parent + 2 trial runs logged through
``SweepTracker``, and the MLflow UI (runs table, compare view) rendered in headless Chromium.

Screenshots go to ``tests/artifacts/mlflow_ui/`` (or ``$TOKENTUNE_TEST_ARTIFACTS``); their paths are
printed (``pytest -s``). Needs the Debian packages ``chromium`` (+ ``chromium-driver`` for selenium);
skipped when Chromium is missing. Uses selenium when installed, else plain ``chromium --headless``
(``TOKENTUNE_UI_TEST_BROWSER=cli`` forces the latter).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.results.mlflow_ui import compare_url, experiment_url, runs_url
from orchestrator.results.tracking import SweepTracker
from tests.conftest import running_mlflow_server

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium chromium-driver)"
)
ARTIFACTS = (
    Path(os.environ.get("TOKENTUNE_TEST_ARTIFACTS", Path(__file__).parent / "artifacts")) / "mlflow_ui"
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_tables):
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), mlflow_tables) as url:
        yield url


@pytest.fixture(scope="module")
def sweep(mlflow_server):
    """A parent run and two finished trial runs with params and metric curves."""
    name = f"ui-sweep-{uuid.uuid4().hex[:6]}"
    tracker = SweepTracker(mlflow_server, "tokentune-ui-test", name)
    parent = tracker.start_parent({"name": name, "search": {"lora.rank": {"grid": [4, 8]}}})
    children = {}
    for i, (trial, rank) in enumerate([("trial-alpha", 4), ("trial-beta", 8)]):
        run = tracker.trial_run(trial, {"methods": ["lora"], "lora": {"rank": rank}, "train": {"lr": 1e-3}})
        for step in (1, 2, 3):
            tracker.log_metrics(run, {"loss": 3.0 / step + i, "tokens_per_s": 500.0 + 10 * step}, step=step)
        tracker.log_metrics(run, {"eval/score": 0.4 + 0.2 * i, "memory/train_gb": (100 + 50 * i) / 1024})
        tracker.end_trial(run, "FINISHED")
        children[trial] = run
    tracker.end_parent("FINISHED")
    return tracker, name, parent, children


# ------------------------------------------------------------------------------------ browsers
def _selenium_driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait_for(driver, texts: list[str], timeout: float = 90) -> bool:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d) -> bool:  # visible text, not page_source: React splits text with comment nodes
        text = d.find_element(By.TAG_NAME, "body").text
        return all(t in text for t in texts)

    try:
        WebDriverWait(driver, timeout).until(shown)
        return True
    except TimeoutException:
        return False


def _wait_for_element(driver, css: str, timeout: float) -> bool:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
        return True
    except TimeoutException:
        return False


def _chromium_cli(url: str, screenshot: Path) -> str:
    """Plain headless Chromium: the DOM after 15 s of virtual time, and a screenshot."""
    base = [CHROMIUM, *CHROMIUM_FLAGS, "--virtual-time-budget=15000"]
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        dom = subprocess.run(
            [*base, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [*base, f"--user-data-dir={profile}", f"--screenshot={screenshot}", url],
            capture_output=True,
            timeout=180,
        )
    return dom


def _selenium_available() -> bool:
    if os.environ.get("TOKENTUNE_UI_TEST_BROWSER") == "cli":  # force the plain-Chromium path
        return False
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return CHROMEDRIVER is not None


def test_mlflow_ui_shows_sweep_runs(sweep, mlflow_server):
    tracker, name, parent, children = sweep
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    landing = experiment_url(mlflow_server, tracker.experiment_id)  # what a user clicks in the list
    table_url = runs_url(mlflow_server, tracker.experiment_id)
    assert table_url.endswith(f"/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
    compare = compare_url(mlflow_server, list(children.values()), tracker.experiment_id)
    assert compare.startswith(f"{mlflow_server}/#/compare-runs?runs=%5B%22")
    shots = {
        "landing": ARTIFACTS / "experiment_landing.png",
        "runs": ARTIFACTS / "experiment_runs.png",
        "compare": ARTIFACTS / "compare_runs.png",
    }

    if _selenium_available():
        from selenium.webdriver.common.by import By

        driver = _selenium_driver()
        try:
            # the URL a sweep prints opens the model-training view on the runs, not MLflow 3's GenAI
            # overview (traces, "no data") that the experiment's plain page shows
            driver.get(landing)
            assert _wait_for(driver, [name]), "the experiment's landing page did not show the sweep's runs"
            time.sleep(1)
            driver.save_screenshot(str(shots["landing"]))

            driver.get("about:blank")
            driver.get(table_url)
            assert _wait_for(driver, [name]), f"the runs table never showed the parent run {name!r}"
            # the trials are nested under the parent row: expand it (the "+" in the run-name cell)
            for button in driver.find_elements(
                By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"
            ):
                button.click()
            nested_shown = _wait_for(driver, list(children), timeout=30)
            time.sleep(1)
            driver.save_screenshot(str(shots["runs"]))

            driver.get("about:blank")  # a full load: the SPA would keep the old page on a hash change
            driver.get(compare)
            want = ["Comparing 2 Runs", "lora.rank", *children]
            assert _wait_for(driver, want), "the compare view never showed both trial runs"
            _wait_for_element(driver, "svg.main-svg", timeout=30)  # the parallel-coordinates plot
            time.sleep(1)
            driver.save_screenshot(str(shots["compare"]))
        finally:
            driver.quit()
        if not nested_shown:
            print("note: could not expand the parent row in the runs table (UI changed?)")
    else:
        dom = _chromium_cli(landing, shots["landing"])
        assert name in dom, "the experiment's landing page did not show the sweep's runs"
        dom = _chromium_cli(table_url, shots["runs"])
        assert name in dom, "the runs table never showed the parent run"
        dom = _chromium_cli(compare, shots["compare"])
        assert all(trial in dom for trial in children), "the compare view never showed the trial run names"
        assert "lora.rank" in dom

    for path in shots.values():
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", path
        print(f"screenshot: {path}")
