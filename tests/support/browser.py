"""A real browser for the service-map test: Debian's Chromium, headless, driven through its
chromedriver by selenium, with its profile in the test's tmp_path; and `l7lab ui` started as a
user starts it, on a free loopback port, read back until it prints its URL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from dataplane.timescale import scaled
from tests.conftest import REPO
from tests.support.cli_lab import L7LAB, free_loopback_port
from tests.support.wait import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS_ENV = "L7LAB_ARTIFACTS"  # a directory that keeps the screenshots (CI uploads it)


@contextmanager
def chromium(profile: Path, width: int = 1600, height: int = 1000) -> Iterator[WebDriver]:
    """Headless Chromium; quit in any case."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def ui_server(lab: str, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`l7lab ui LAB --listen 127.0.0.1:<free port>` in a subprocess; yields the URL it printed,
    and stops it with SIGINT (Ctrl-C) afterwards, which must end it with exit 0."""
    port = free_loopback_port()
    with open(log, "w+") as out:
        proc = subprocess.Popen([*L7LAB, "ui", lab, "--listen", f"127.0.0.1:{port}", "--json"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            def printed_url() -> str:
                assert proc.poll() is None, f"l7lab ui exited: {log.read_text()}"
                for line in log.read_text().splitlines():
                    if line.startswith("{"):
                        return json.loads(line)["url"]
                return ""
            url = wait_for("l7lab ui to print its URL", printed_url, timeout=60, every=0.1)
            assert url == f"http://127.0.0.1:{port}/"
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=scaled(20))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert proc.returncode == 0, f"l7lab ui did not exit 0 on Ctrl-C ({proc.returncode}): {log.read_text()}"


def keep_screenshot(driver: WebDriver, path: Path) -> Path:
    """Save a screenshot at `path` (in the test's tmp_path, which pytest keeps) and copy it to
    $L7LAB_ARTIFACTS if that names a directory; print where it is."""
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    artifacts = os.environ.get(ARTIFACTS_ENV)
    if artifacts and Path(artifacts).is_dir():
        copy = Path(shutil.copy(path, Path(artifacts) / path.name))
        print(f"screenshot copied to {copy}")
    return path
