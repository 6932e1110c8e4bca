"""The operator web view in a real browser: Debian's chromium driven by Playwright
(executable_path, the flags of wave2-facts), against `devid serve --http` with a device enrolled
over DTLS by the test. The pages show the device, its verdict and its certificate's expiry; the
log page its integrity; revoking through the page (login form, confirmation, CSRF-checked POST)
makes the gateway refuse the device's next renewal. With DEVID_SCREENSHOTS=1 the screenshots of
docs/operations.md are written to docs/ (the run that made them)."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from devid.gateway.device.enroll import renew
from devid.gateway.device.protocol import EnrollFailed

from .conftest import run_devid
from .operator_helpers import call, enroll_devices, make_fleet, start

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    data, factory = make_fleet(root, count=5)
    s = start(data, factory, root / "serve.log")
    try:
        enroll_devices(s, "TS00000001", "TS00000002", "TS00000004")
        yield s
    finally:
        assert s.stop() == 0
        assert "Traceback" not in s.log.read_text()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    assert os.path.exists(CHROMIUM), "chromium is not installed (scripts/setup --test installs it)"
    with sync_playwright() as p:
        # Playwright gives the browser a fresh temporary profile itself (no --user-data-dir)
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


def shot(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"operations-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    if os.environ.get("DEVID_SCREENSHOTS") == "1":
        shutil.copy(path, DOCS / path.name)


def test_the_pages_show_the_fleet_and_revoking_refuses_the_device(served, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    url = served.url
    # no credential: the login form, with a 401
    answer = page.goto(url + "/devices")
    assert answer.status == 401 and page.locator("input[name=token]").count() == 1
    page.fill("input[name=token]", "devid_op_not-the-token-" + "x" * 30)
    page.click("button[type=submit]")
    assert page.locator("#message").inner_text() == "That is not the operator token."
    shot(page, "login", tmp_path)
    page.fill("input[name=token]", served.token)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/devices")
    cookie = [c for c in page.context.cookies() if c["name"] == "devid_session"][0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and served.token not in cookie["value"]

    # the fleet: the enrolled devices with their certificates' expiry; the filters
    api = call(url + "/api/v1/devices/TS00000001/certificates", token=served.token).json["certificates"]
    expires = [c for c in api if c["profile"] == "operational"][0]["not_after"]
    row = page.locator("#fleet tr", has_text="TS00000001")
    assert "enrolled" in row.inner_text() and expires in row.inner_text()
    shot(page, "fleet", tmp_path)
    page.select_option("select[name=state]", "manufactured")
    page.click("form.filters button")
    assert page.locator("#fleet").inner_text().count("TS0000000") == 2     # TS00000003 and TS00000005
    page.goto(url + "/devices?limit=2")
    page.click("#next")
    assert "TS00000003" in page.locator("#fleet").inner_text() and "TS00000001" not in page.locator("#fleet").inner_text()

    # the device: its certificate's expiry and its verdict with the claims
    page.goto(url + "/devices/TS00000001")
    assert page.locator("#expires").inner_text() == expires
    assert page.locator("#history .tier").first.inner_text() == "affirming"
    assert expires in page.locator("#certificates").inner_text()
    shot(page, "device", tmp_path)

    # the log, with its integrity status
    page.goto(url + "/log")
    assert "verified" in page.locator("#integrity").inner_text()
    assert page.locator("#log").inner_text().count("affirming") == 3
    shot(page, "log", tmp_path)
    page.goto(url + "/")
    assert page.locator("#devices-enrolled").inner_text() == "3"
    assert page.locator("#issued").inner_text() == "3"
    shot(page, "overview", tmp_path)

    # a forged form (no CSRF value) is refused, and revokes nothing
    forged = page.request.post(url + "/devices/TS00000002/revoke", form={"confirm": "yes", "reason": "keyCompromise"},
                               headers={"Origin": url})
    assert forged.status == 403
    assert call(url + "/api/v1/devices/TS00000002", token=served.token).json["state"] == "enrolled"

    # revoke TS00000002 through the page: the button, the confirmation, the POST
    page.goto(url + "/devices/TS00000002")
    page.click("#revoke")
    page.select_option("select[name=reason]", "keyCompromise")
    shot(page, "revoke", tmp_path)
    page.click("#confirm")
    assert page.locator("#result").inner_text() == "Device TS00000002 revoked"
    page.goto(url + "/devices/TS00000002")
    assert page.locator("#state").inner_text() == "revoked"
    page.close()

    # the gateway refuses the revoked device at its next renewal (a real DTLS attempt), not the others
    # (in a thread of its own: Playwright's sync API keeps an event loop running in this one)
    def renewal(serial: str, timeout: float):
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, renew(served.factory / serial, served.coap, timeout=timeout)).result()
    with pytest.raises(EnrollFailed, match="certificate revoked"):
        renewal("TS00000002", 10)
    assert renewal("TS00000004", 30) is not None
    logged = served.log.read_text()
    assert '"via": "web"' in logged and '"device": "TS00000002"' in logged


def _raw(served, method: str, path: str, headers: dict | None = None, body: str | bytes | None = None):
    """One HTTP request as a browser would send it (no redirect followed): (status, headers, text)."""
    parts = urlsplit(served.url)
    con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        con.request(method, path, body=body, headers=headers or {})
        r = con.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        con.close()


FORM = "application/x-www-form-urlencoded"


def _login(served, next_path: str = "/"):
    return _raw(served, "POST", "/login", {"Origin": served.url, "Content-Type": FORM},
                urlencode({"token": served.token, "next": next_path}))


def test_sessions_forms_and_the_login_redirect(served):
    """Without a browser, what a browser (or an attacker's page) can send: the login's `next` stays
    on this listener, a tampered or non-ASCII cookie is the login form (never a 500), a form
    posted from another origin is refused even with the session and its CSRF value, and rotating
    the token ends every session."""
    for bad in ("/\t/evil.example", "/\n/evil.example", "//evil.example", "/\\evil.example",
                "https://evil.example/", " /devices", "/\x7f/evil.example"):
        status, h, _ = _login(served, bad)
        assert status == 303 and h["location"] == "/", (bad, h)
    status, h, _ = _login(served, "/devices?state=enrolled")
    assert status == 303 and h["location"] == "/devices?state=enrolled"
    cookie = h["set-cookie"].split(";")[0]
    issued, mac = cookie.split("=", 1)[1].split(".")
    status, _, page = _raw(served, "GET", "/devices/TS00000004/revoke", {"Cookie": cookie})
    assert status == 200
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)

    tampered = [f"{issued}.{mac[:-1]}{'1' if mac[-1] == '0' else '0'}", f"{int(issued) + 1}.{mac}",
                f"{issued}.{mac[:-1]}\u00e9", f"\u0661\u0662.{mac}", issued + "." + "\u00e9" * 64]
    for value in tampered:
        status, _, text = _raw(served, "GET", "/", {"Cookie": f"devid_session={value}".encode()})
        assert status == 401 and 'name="token"' in text, value

    revoke = "/devices/TS00000004/revoke"
    form = urlencode({"csrf": csrf, "confirm": "yes", "reason": "keyCompromise"})
    for origin in ({"Origin": "https://evil.example"}, {"Referer": "https://evil.example/page"}, {"Origin": "null"}):
        status, _, _ = _raw(served, "POST", revoke, {"Cookie": cookie, "Content-Type": FORM, **origin}, form)
        assert status == 403, origin
    odd = urlencode({"csrf": "\u00e9" * 64, "confirm": "yes", "reason": "keyCompromise"})
    status, _, _ = _raw(served, "POST", revoke, {"Cookie": cookie, "Content-Type": FORM, "Origin": served.url}, odd)
    assert status == 403
    assert call(served.url + "/api/v1/devices/TS00000004", token=served.token).json["state"] == "enrolled"

    assert _raw(served, "GET", "/", {"Cookie": cookie})[0] == 200
    rotated = run_devid("operator", "token", "--rotate", data_dir=served.data.path, check=True).stdout.decode().strip()
    served.token = rotated
    status, _, text = _raw(served, "GET", "/", {"Cookie": cookie})
    assert status == 401 and 'name="token"' in text
