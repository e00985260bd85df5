"""The service map in a real browser: a lab of the retail scenario brought up with `l7lab up`,
`l7lab ui` serving it on loopback, Debian's headless Chromium showing the page, and real traffic
from the pods. Everything asserted is read from the page's DOM, as a user sees it: the edge
frontend-app -> inventory-api turns L7-denied once a DELETE is answered 403 (without a reload),
its side panel names the policy and the DELETE with its 403, and the edge reporting ->
inventory-api shows as dropped, its panel naming the policy that isolates inventory-api (read
from scenarios/policies/retail.yaml). An allowed GET makes the edge lab node -> inventory-api,
which the page labels as the L7 proxy's upstream leg on behalf of frontend-app. A screenshot of the page is kept as the test's artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import WebDriverWait

from dataplane import lab as labmod
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.browser import chromium, keep_screenshot, ui_server
from tests.support.cli_lab import RETAIL, curl, l7lab, leftovers, nothing_left, reaches

pytestmark = pytest.mark.kernel

DEADLINE = scaled(60.0)  # seconds for the page to show what the traffic did (a loaded machine is slow)
FRONTEND, INVENTORY, REPORTING = "retail/frontend-app", "retail/inventory-api", "retail/reporting"


def inventory_policy() -> str:
    """The policy guarding inventory-api, as flow records name it, read from the scenario's file."""
    for doc in yaml.safe_load_all((REPO / "scenarios" / "policies" / "retail.yaml").read_text()):
        if doc["spec"]["endpointSelector"]["matchLabels"].get("app") == "inventory-api":
            return f"{doc['kind']} {doc['metadata']['namespace']}/{doc['metadata']['name']}"
    raise AssertionError("no policy selects inventory-api in scenarios/policies/retail.yaml")


# The map redraws as flows arrive: an element found a moment ago may be replaced before it is read,
# so a wait reads it again rather than failing.
LIVE_REDRAW = (StaleElementReferenceException,)

def edge(driver: WebDriver, source: str, destination: str, kind: str = "g.edge") -> WebElement | None:
    found = driver.find_elements(By.CSS_SELECTOR, f'{kind}[data-from="{source}"][data-to="{destination}"]')
    return found[0] if found else None


def edge_verdict(driver: WebDriver, source: str, destination: str) -> str:
    element = edge(driver, source, destination)
    return element.get_attribute("data-verdict") or "" if element is not None else ""


def open_edge(driver: WebDriver, source: str, destination: str) -> list[WebElement]:
    """Click the edge (on its count, at the middle of its curve) and wait for its side panel;
    the panel's rows, newest first."""
    edge(driver, source, destination, "g.edge-badge").click()
    wait = WebDriverWait(driver, DEADLINE, ignored_exceptions=LIVE_REDRAW)
    wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed()
               and d.find_element(By.ID, "detail").get_attribute("data-from") == source
               and d.find_element(By.ID, "detail").get_attribute("data-to") == destination)
    return wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-flows tbody tr.flow"))


def cells(row: WebElement) -> dict[str, str]:
    return {name: row.find_element(By.CSS_SELECTOR, f"td.{name}").text
            for name in ("time", "verdict", "request", "policy")}


def test_the_service_map_shows_what_the_policies_did_live(tmp_path: Path) -> None:
    name = unique_lab("ui")
    up = l7lab("up", str(RETAIL), "--name", name)
    assert up.returncode == 0, up.stderr
    try:
        record = labmod.LabRecord.load(name)
        assert record is not None
        inventory = f"http://{record.endpoints[INVENTORY].ip}:8080/api/inventory/1"
        policy = inventory_policy()
        with ui_server(name, tmp_path / "ui.log") as url, chromium(tmp_path / "chromium-profile") as driver:
            driver.get(url)
            wait = WebDriverWait(driver, DEADLINE, ignored_exceptions=LIVE_REDRAW)
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "live")
            assert driver.find_element(By.ID, "lab").text == f"lab {name}"
            pods = {e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, 'g.node[data-kind="pod"]')}
            assert pods == {FRONTEND, INVENTORY, "retail/payment-gateway", REPORTING}
            assert edge(driver, FRONTEND, INVENTORY) is None  # nothing sent yet
            driver.execute_script("window.sameDocument = true")  # gone if the page reloads

            denied = curl(name, "frontend-app", inventory, "-X", "DELETE")
            assert denied.returncode == 0 and denied.stdout.strip() == "Access denied", denied
            wait.until(lambda d: edge_verdict(d, FRONTEND, INVENTORY) == "l7-denied")
            assert not reaches(name, "reporting", inventory, False)
            wait.until(lambda d: edge_verdict(d, REPORTING, INVENTORY) == "dropped")
            assert driver.execute_script("return window.sameDocument === true")  # updated live, not reloaded

            rows = [cells(r) for r in open_edge(driver, REPORTING, INVENTORY)]
            assert rows and all(r["verdict"] == "DROP POLICY_DENIED ingress" and r["request"] == "TCP :8080"
                                for r in rows), rows
            # a default deny names the policy whose selection of inventory-api enforces its ingress
            assert all(r["policy"] == f"default deny: isolated by {policy}" for r in rows), rows
            rows = [cells(r) for r in open_edge(driver, FRONTEND, INVENTORY)]
            denials = [r for r in rows if r["verdict"] == "L7 denied ingress"]
            assert len(denials) == 1, rows
            assert denials[0]["request"].replace("\n", " ") == "DELETE /api/inventory/1 → 403"
            assert policy in denials[0]["policy"].splitlines()
            # the kernel's verdict on the connection names the rule that sent it to the proxy
            assert any(r["verdict"].startswith("REDIRECT") and f"{policy} ingress[0]" in r["policy"].splitlines()
                       for r in rows), rows
            assert driver.find_element(By.CSS_SELECTOR, "#detail-summary .tag").text == "L7-denied"
            assert not driver.find_element(By.ID, "detail-note").is_displayed()

            # An allowed GET: the proxy forwards it on a connection of its own, from the lab node's
            # stack with frontend-app's identity; the page says whose it is.
            allowed = curl(name, "frontend-app", inventory)
            assert allowed.returncode == 0, allowed
            wait.until(lambda d: edge_verdict(d, "node", INVENTORY) == "forwarded")
            upstream = [cells(r) for r in open_edge(driver, "node", INVENTORY)]
            assert upstream and all(r["verdict"] == "FORWARD ingress" and
                                    r["policy"] == "none looked up: the L7 proxy's own connection"
                                    for r in upstream), upstream
            note = driver.find_element(By.ID, "detail-note")
            assert note.is_displayed() and note.text.startswith(f"L7 proxy upstream on behalf of {FRONTEND}:"), note.text

            shot = keep_screenshot(driver, tmp_path / "service-map.png")
            assert shot.stat().st_size > 10_000  # a page, not a blank image
            # The page ran without an error: no script error, nothing blocked by its CSP, no 404.
            assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        down = l7lab("down", name)
        assert down.returncode == 0, down.stderr
        assert nothing_left(name), leftovers(name)
