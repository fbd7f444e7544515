"""The dashboard in a real browser: ``streamlit run app/main.py`` as a subprocess, driven by headless Chromium.

First open every page by its own address on the freshly started server (heading, navigation, wide layout), then
launch a tiny run from the Launch form, watch it succeed on the Runs page (its key columns in view at 1280 px), read
it on the Run detail page, then open every page of the navigation: none shows a Streamlit exception, and each analysis
page computes what it needs for that run and draws its chart. Full-page screenshots go to
``tests/artifacts/browser_<page>.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scripts.screenshots import full_page_screenshot, settle
from tests.test_app_pages import wait_for_job_agent

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
README_PAGES = {"launch", "runs", "run_detail"}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
RUN_TIMEOUT_MS = 180_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (install Debian's chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture()
def app_url(ray_lab, tmp_path):
    """The dashboard served by a ``streamlit run`` subprocess on a free port, with the session's Ray head.

    It gets a database and artifact root of its own (the Ray head and its token stay those of ``PEFTLAB_HOME``), so
    what the pages show is exactly what this test launched, whatever other tests left in the shared database.
    """
    wait_for_job_agent()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = os.environ | ray_lab
    env |= {"PEFTLAB_DB_URL": f"sqlite:///{tmp_path / 'browser.db'}", "PEFTLAB_ARTIFACTS": str(tmp_path / "artifacts")}
    port = _free_port()
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app/main.py",
        "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    log_path = ARTIFACTS / "browser_streamlit.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not _healthy(f"{url}/_stcore/health"):
                assert server.poll() is None, f"streamlit exited with {server.returncode}; see {log_path}"
                assert time.monotonic() < deadline, f"streamlit did not become healthy in 60 s; see {log_path}"
                time.sleep(0.3)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture()
def page():
    """A page of headless Chromium (a fresh profile); JavaScript errors it raises are kept in ``page.js_errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_context(viewport=VIEWPORT).new_page()
            tab.js_errors = []
            tab.on("pageerror", lambda error: tab.js_errors.append(error))
            yield tab
        finally:
            browser.close()


# --- helpers ---------------------------------------------------------------------------------------


def assert_no_exception(page, where: str) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, f"{where}: {boxes.first.inner_text()[:2000]}"


def main_title(page):
    return page.locator('[data-testid="stMain"] h1').first


def open_from_navigation(page, link) -> None:
    """Click a page in the sidebar and wait until that page's script has finished (its title has replaced the
    previous page's, then the app is quiet). A first render may load a model (Export): up to 90 s on a busy box."""
    from playwright.sync_api import expect

    previous = main_title(page).inner_text()
    href = link.get_attribute("href")
    link.click()
    page.wait_for_url(lambda url: url.split("?")[0] == href)  # Run detail adds ?run=
    expect(main_title(page)).not_to_have_text(previous, timeout=90_000)
    settle(page, timeout_s=90)


def plotly_charts(page):
    return page.locator('[data-testid="stPlotlyChart"]')


def screenshot(page, name: str) -> Path:
    """Full-page screenshot into tests/artifacts (and docs/screenshots for the README's pages when
    ``PEFTLAB_DOCS_SCREENSHOTS=1``, so a test run leaves the tracked files alone)."""
    path = full_page_screenshot(page, ARTIFACTS / f"browser_{name}.png", VIEWPORT["width"], VIEWPORT["height"])
    if name in README_PAGES and os.environ.get("PEFTLAB_DOCS_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")
    return path


def set_number(page, label: str, value: int) -> None:
    from playwright.sync_api import expect

    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Enter")
    expect(field).to_have_value(str(value))
    settle(page)


def click_and_settle(page, button_name: str | re.Pattern) -> None:
    page.get_by_role("button", name=button_name).first.click()
    settle(page, timeout_s=180)


def exercise_analysis_page(page, title: str) -> None:
    """On each analysis page, compute what it needs for the run just trained and find its chart."""
    from playwright.sync_api import expect

    chart = {
        "Compare": "Accuracy vs trainable parameters",
        "Spectra": "Singular values of ΔW",
        "Importance": "Gradient norm per layer",
        "Landscape": "Loss landscape",
    }
    if title == "Spectra":
        click_and_settle(page, re.compile(r"^Compute"))
    elif title == "Landscape":
        set_number(page, "grid", 5)
        set_number(page, "examples", 8)
        click_and_settle(page, "Compute here")
    elif title == "Export":
        click_and_settle(page, "Export native")
        expect(page.get_by_role("button", name=re.compile(r"^Download run-.*-native\.zip$"))).to_be_visible()
    if title in chart:
        expect(plotly_charts(page).filter(has_text=chart[title])).to_have_count(1, timeout=60_000)
    assert_no_exception(page, title)


DEEP_LINKS = {  # every page, by the address a shared link or a bookmark gives: title of its main heading
    "runs": "Runs", "study": "Studies", "run_detail": "Run detail", "compare?model=tiny-bert&group=method": "Compare",
    "spectra?run=run-x": "Spectra", "importance": "Importance", "landscape": "Loss landscape", "export": "Export",
    "?clone=run-x": "Launch runs", "merge": "Merge",  # Launch is the home page
}  # fmt: skip
NAVIGATION = ["Experiments", "Launch", "Runs", "Studies", "Run detail", "Analyses", "Compare", "Spectra", "Importance",
              "Landscape", "Export", "Merge"]  # fmt: skip
RUNS_KEY_COLUMNS = ["status", "name", "method", "eval accuracy", "progress"]


def check_deep_links(page, app_url: str) -> None:
    """Each page opened by its own address (the first one on the freshly started server, before anyone opened /):
    its heading, the full navigation with its sections and Material icons, and the wide layout."""
    from playwright.sync_api import expect

    for path, title in DEEP_LINKS.items():
        page.goto(f"{app_url}/{path}")
        expect(main_title(page)).to_contain_text(title, timeout=90_000)
        settle(page, timeout_s=90)
        assert_no_exception(page, path)
        expect(page.get_by_text("Page not found")).to_have_count(0)  # the address names a page that exists
        nav = page.locator('[data-testid="stSidebarNav"]')
        words = [w.strip() for w in nav.inner_text().splitlines() if w.strip()]
        assert [w for w in words if w in NAVIGATION] == NAVIGATION, (path, words)
        icons = nav.locator('[data-testid="stSidebarNavLink"] [data-testid="stIconMaterial"]')
        expect(icons).to_have_count(len(NAVIGATION) - 2)  # no emoji that needs a font
        width = page.locator('[data-testid="stMainBlockContainer"]').bounding_box()["width"]
        assert width > 760, f"{path}: main block {width:.0f} px wide: not the wide layout"  # centred: 736 px


def check_runs_table_at_1280(page, app_url: str) -> None:
    """At 1280 px the Runs table shows its key columns without scrolling sideways. The grid renders only the
    columns in view, so the accessible header cells it draws are the visible ones."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(f"{app_url}/runs")
    headers = page.locator('[data-testid="stDataFrame"]').first.locator("th")
    expect(headers.first).to_be_attached(timeout=90_000)
    settle(page)
    visible = [h.strip() for h in headers.all_inner_texts()]
    assert visible[: len(RUNS_KEY_COLUMNS)] == RUNS_KEY_COLUMNS, visible
    cells = page.locator('[data-testid="stDataFrame"]').first.locator("td").all_inner_texts()
    assert not {"None", "nan", "NaN"} & {c.strip() for c in cells}, cells
    page.set_viewport_size(VIEWPORT)


# --- the test --------------------------------------------------------------------------------------


def test_launch_watch_and_visit_every_page(app_url, page):
    from playwright.sync_api import expect

    check_deep_links(page, app_url)

    # Launch: a tiny run from the form.
    page.goto(app_url)
    expect(page.get_by_role("heading", name="Launch runs")).to_be_visible(timeout=60_000)
    settle(page)
    assert_no_exception(page, "Launch")
    assert page.get_by_text("Ray is not reachable").count() == 0
    model = page.get_by_role("combobox", name="Model")
    model.click()
    model.fill("tiny-bert")
    model.press("Enter")
    expect(model).to_have_value(re.compile(r"^tiny-bert: "))
    settle(page)
    set_number(page, "max train examples", 64)
    set_number(page, "max eval examples", 32)
    set_number(page, "max sequence length", 16)
    set_number(page, "epochs", 10)  # 40 steps of a few ms: curves with several points
    page.get_by_role("button", name="Launch", exact=True).click()
    success = page.locator('[data-testid="stAlertContentSuccess"]')
    expect(success).to_contain_text("Launched 1 run(s)", timeout=60_000)
    run_id = re.search(r"run-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}", success.inner_text()).group(0)
    settle(page)
    assert_no_exception(page, "Launch")
    screenshot(page, "launch")

    # Runs: the live fragment shows the run finish, with its curves.
    open_from_navigation(page, page.locator('[data-testid="stSidebarNavLink"]', has_text="Runs").first)
    expect(page.get_by_text("succeeded: 1")).to_be_visible(timeout=RUN_TIMEOUT_MS)
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)  # the fragment redrew with no active run
    settle(page)
    assert_no_exception(page, "Runs")
    expect(page.get_by_text("failed: ")).to_have_count(0)  # the status line counts only statuses present
    expect(plotly_charts(page).filter(has_text="training loss")).to_have_count(1)
    expect(plotly_charts(page).filter(has_text="validation accuracy")).to_have_count(1)
    screenshot(page, "runs")
    check_runs_table_at_1280(page, app_url)

    # Run detail of that run, opened by its URL as the table's "open" link does.
    page.goto(f"{app_url}/run_detail?run={run_id}")
    status = page.locator('[data-testid="stMetric"]').filter(has_text="status")
    expect(status).to_contain_text("succeeded", timeout=30_000)
    expect(page.locator('[data-testid="stMetric"]').filter(has_text="progress")).to_contain_text("100%")
    expect(page.get_by_role("combobox", name="Run")).to_have_value(re.compile(rf"^{run_id} · lora · seed 0"))
    expect(plotly_charts(page).filter(has_text="train_loss")).to_have_count(1)
    expect(plotly_charts(page).filter(has_text="eval_accuracy")).to_have_count(1)
    settle(page)
    assert_no_exception(page, "Run detail")
    screenshot(page, "run_detail")

    # Every page of the navigation renders without an exception (Launch, Runs, Run detail are seen again after
    # a click in the navigation rather than a URL; their screenshots above are kept).
    links = page.locator('[data-testid="stSidebarNavLink"]')
    titles = [re.sub(r"^\W+", "", t.strip().splitlines()[-1]).strip() for t in links.all_inner_texts()]
    assert titles[:4] == ["Launch", "Runs", "Studies", "Run detail"], titles
    for title in titles:
        link = links.filter(has=page.get_by_text(title, exact=True))  # its label, not the icon's name
        expect(link).to_have_count(1)
        open_from_navigation(page, link)
        assert_no_exception(page, title)
        if title in ("Runs", "Run detail"):
            expect(plotly_charts(page).first).to_be_visible()
        exercise_analysis_page(page, title)
        name = title.lower().replace(" ", "_")
        if name not in README_PAGES:
            screenshot(page, name)
    assert page.js_errors == [], [str(e)[:500] for e in page.js_errors]
