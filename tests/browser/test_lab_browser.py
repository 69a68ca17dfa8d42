"""A real JupyterLab in a real (headless) Chromium: run the tour notebook, click Generate, see both continuations.

Needs Debian's `chromium` and `chromium-driver` (scripts/install_system_deps.sh, run by `make install`) and the
`jupyterlab` and `selenium` Python packages (the dev extra). The server listens on 127.0.0.1 only, with a token;
the notebook runs from a copy in the test's folder, so the committed notebook never gets outputs.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from cpwb.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
TOUR = REPO / "notebooks" / "00_tour.ipynb"
# Small enough that the whole notebook runs in about a minute on a 2-core CPU.
TOUR_PARAMETERS = {"n_pairs": 6, "steps": 3}
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1100")
NEW_PROMPT = "You are such a stupid"
RUN_ALL_TIMEOUT_S = 600
RUN_ALL_TRIES = 3
GENERATE_TIMEOUT_S = 180


def _require(program: str) -> str:
    """Path of an installed program, or a failure that says how to install it."""
    found = shutil.which(program)
    if found is None:
        pytest.fail(f"{program} not found: run `bash scripts/install_system_deps.sh` (`make install` does)")
    return found


@dataclass
class Lab:
    """A running JupyterLab: its URL, token, root folder and log."""

    url: str
    token: str
    root: Path
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


def _wait_for_server(lab: Lab, process: subprocess.Popen, timeout_s: float = 90) -> None:
    """Poll the REST API until the server answers, failing early if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {process.returncode}:\n{lab.log_tail()}")
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status?token={lab.token}", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout_s} s:\n{lab.log_tail()}")


def _wait_for_kernel_connected(lab: Lab, notebook: str, timeout_s: float = 120) -> None:
    """Wait until the server holds a session for `notebook` whose idle kernel has the page's websocket attached:
    JupyterLab's own busy/idle indicator reads idle before the kernel is attached, and a run asked for then is lost."""
    request = urllib.request.Request(f"{lab.url}/api/sessions", headers={"Authorization": f"token {lab.token}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(request, timeout=10) as reply:
            sessions = json.load(reply)
        if any(s["path"] == notebook and s["kernel"]["connections"] >= 1 and
               s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.5)
    pytest.fail(f"no connected kernel for {notebook} within {timeout_s} s:\n{lab.log_tail()}")


def _stop_server(lab: Lab, process: subprocess.Popen) -> None:
    """Ask the server to shut down (its kernels with it), then make sure the process is gone."""
    request = urllib.request.Request(f"{lab.url}/api/shutdown", method="POST",
                                     headers={"Authorization": f"token {lab.token}"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
        process.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1 with a token, serving a folder that holds a parameterised copy of the tour."""
    root = tmp_path_factory.mktemp("lab")
    notebook = parameterize_notebook(load_notebook_node(str(TOUR)),
                                     {**TOUR_PARAMETERS, "run_dir": str(root / "run")})
    atomic_write_text(root / "notebooks" / TOUR.name, nbformat.writes(notebook))
    # no news or update questions: the machine is offline and the toast would cover the page
    atomic_write_json(root / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                      {"fetchNews": "false", "checkForUpdates": False})
    lab = Lab(f"http://127.0.0.1:{free_port()}", secrets.token_hex(24), root, root / "lab.log")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={lab.url.rsplit(':', 1)[1]}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={lab.token}", f"--ServerApp.root_dir={root}",
               f"--LabServerApp.workspaces_dir={root / 'workspaces'}",
               f"--LabServerApp.user_settings_dir={root / 'settings'}",
               "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False",
               "--LabApp.extension_manager=readonly", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(lab.log, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        _wait_for_server(lab, process)
        yield lab
    finally:
        _stop_server(lab, process)


@pytest.fixture
def browser():
    """Headless Debian Chromium driven by its own chromedriver (no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _require("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(_require("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _click_menu(driver, wait, menu: str, item: str) -> None:
    """Open a main-menu entry and click one of its items, as a person would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-MenuBar-item')][.//div[normalize-space()='{menu}']]"))).click()
    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-Menu-item')][.//div[normalize-space()='{item}']]"))).click()


def _run_all_cells(driver, wait) -> None:
    """Run > Run All Cells, until the first cell is queued.

    A run asked for while JupyterLab is still attaching the kernel to the notebook's session runs nothing (every
    prompt stays [ ]) or opens a "Select Kernel" dialog; a person would accept the dialog and click again, and so
    does this.
    """
    from selenium.common.exceptions import ElementClickInterceptedException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def started(_) -> bool:
        prompts = driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")
        return any(p.text.strip() not in ("", "[ ]:") for p in prompts)

    def started_or_asked(_) -> bool:
        return started(_) or bool(driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"))

    for _ in range(RUN_ALL_TRIES):
        for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"):
            button.click()
        wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")))
        try:
            _click_menu(driver, wait, "Run", "Run All Cells")
            WebDriverWait(driver, 30).until(started_or_asked)
        except (ElementClickInterceptedException, TimeoutException):
            pass
        if started(driver):
            return
        print("Run All Cells did not start the notebook: clicking it again")
    pytest.fail(f"Run All Cells did not start the notebook in {RUN_ALL_TRIES} tries")


def _notebook_errors(driver) -> str:
    """Tracebacks shown in the notebook's outputs, for failure messages."""
    from selenium.webdriver.common.by import By

    shown = driver.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.error']")
    return "\n".join(e.text for e in shown) or "(no error output in the notebook)"


def _check_playground_reacts(driver, picture: Path) -> None:
    """Move the loss playground's "phi N1" slider with the keyboard and wait for the live figure's title to change."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    playground = driver.find_element(By.CSS_SELECTOR, ".cpwb-loss-playground")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", playground)
    title = playground.find_element(By.CSS_SELECTOR, ".gtitle").text
    handle = playground.find_element(By.XPATH, ".//div[contains(@class,'widget-slider')]"
                                               "[.//label[normalize-space()='phi N1']]"
                                               "//div[contains(@class,'noUi-handle')]")
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT * 30)  # 30 steps of 0.05: N1 from 2.80 to 4.30, from hard to easy
    readout = playground.find_element(By.CSS_SELECTOR, ".cpwb-loss-readout")
    try:
        WebDriverWait(driver, 60).until(lambda _: "N1 4.30" in readout.text)  # the kernel saw every key press
    except TimeoutException:
        pytest.fail(f"the playground did not follow the slider to 4.30; it shows:\n{readout.text}")
    assert playground.find_element(By.CSS_SELECTOR, ".gtitle").text != title  # and redrew the live figure
    atomic_write_bytes(picture, playground.screenshot_as_png)


def _check_pairs_browser_pages(driver, picture: Path) -> None:
    """Press "next" in the pairs browser and wait for its second page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pairs = driver.find_element(By.CSS_SELECTOR, ".cpwb-pairs-browser")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", pairs)
    first = pairs.find_element(By.CSS_SELECTOR, ".cpwb-pairs-table").text
    pairs.find_element(By.XPATH, ".//button[contains(normalize-space(), 'next')]").click()
    WebDriverWait(driver, 60).until(lambda _: "page 2 /" in pairs.text)
    assert pairs.find_element(By.CSS_SELECTOR, ".cpwb-pairs-table").text != first
    atomic_write_bytes(picture, pairs.screenshot_as_png)


def _side_text(driver, side: str, part: str) -> str:
    """Text of one part (.cpwb-tox, .cpwb-text, ...) of one side of the live compare widget."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f".cpwb-compare .cpwb-side-{side} {part}").text


@pytest.mark.slow
def test_tour_runs_in_jupyterlab_and_generate_shows_both_continuations(lab, browser):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shot = lab.root / "run" / "browser_test_screenshot.png"
    wait = WebDriverWait(browser, 120)
    try:
        browser.get(f"{lab.url}/lab/tree/notebooks/{TOUR.name}?token={lab.token}")
        _wait_for_kernel_connected(lab, f"notebooks/{TOUR.name}")
        _run_all_cells(browser, wait)
        # the notebook's last cell generates once and shows the live compare widget with "run 1"
        WebDriverWait(browser, RUN_ALL_TIMEOUT_S).until(ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, ".cpwb-compare .cpwb-status"), "run 1"))
        assert browser.find_elements(By.CSS_SELECTOR, ".cpwb-loss-playground .js-plotly-plot"), \
            "the loss playground's live plotly figure is not on the page"
        assert browser.find_elements(By.CSS_SELECTOR, ".cpwb-pairs-browser .cpwb-pairs-table")
        _check_playground_reacts(browser, lab.root / "run" / "browser_test_loss_playground.png")
        _check_pairs_browser_pages(browser, lab.root / "run" / "browser_test_pairs_browser.png")
        box = browser.find_element(By.CSS_SELECTOR, ".cpwb-compare textarea")
        box.send_keys(Keys.CONTROL, "a")  # select the notebook's prompt and type over it, as a person would
        box.send_keys(NEW_PROMPT)
        browser.find_element(By.CSS_SELECTOR, ".cpwb-compare button.cpwb-generate").click()
        WebDriverWait(browser, GENERATE_TIMEOUT_S).until(ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, ".cpwb-compare .cpwb-status"), "run 2"))
        status = browser.find_element(By.CSS_SELECTOR, ".cpwb-compare .cpwb-status").text
        assert f"prompt: {NEW_PROMPT}" in status, status
        for side in ("base", "cp"):
            assert re.fullmatch(r"toxicity [01]\.\d{3}", _side_text(browser, side, ".cpwb-tox")), side
            assert _side_text(browser, side, ".cpwb-text").strip(), f"{side} continuation is empty"
            tokens = browser.find_elements(By.CSS_SELECTOR, f".cpwb-compare .cpwb-side-{side} .cpwb-token")
            assert tokens and tokens[0].get_attribute("title").startswith("NLL ")
        compare = browser.find_element(By.CSS_SELECTOR, ".cpwb-compare")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", compare)
        time.sleep(0.5)  # let the scroll settle before the picture
    except TimeoutException:
        pytest.fail(f"timed out; notebook errors:\n{_notebook_errors(browser)}\nserver log:\n{lab.log_tail()}")
    finally:
        atomic_write_bytes(shot, browser.get_screenshot_as_png())
        print(f"screenshot: {shot}\nJupyterLab log: {lab.log}")
    assert shot.stat().st_size > 10_000
