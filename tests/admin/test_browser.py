"""The admin in a real browser: Debian's headless Chromium, driven by Selenium.

Log in, open the delivery log, filter failed messages, open one (payload and error),
requeue it, watch the live page show a new payout without a reload, and open the
health chart. A screenshot of each step goes to ``test-artifacts/screenshots/``.

Skipped when ``/usr/bin/chromium`` or Selenium is missing, except in CI (``CI=true``),
where that is a failure. Nothing leaves 127.0.0.1: the browser runs with background
networking, sync and component updates off, and only loads the live test server.
"""

from __future__ import annotations

import os
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from django_cdp.models import Message
from tests.admin.conftest import create_message

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium: pip install selenium"
    return None


@pytest.fixture
def browser():
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def test_operate_the_delivery_log_in_a_browser(browser, live_server, transactional_db):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    from example_project.payouts.models import Payout
    from example_project.shops.models import Plan, Shop

    wait = WebDriverWait(browser, 15)
    step = iter(range(1, 100))

    def shot(name: str) -> None:
        browser.save_screenshot(str(SCREENSHOTS / f"{next(step):02d}-{name}.png"))

    User.objects.create_superuser("root", password="pw")
    create_message(user_id="shop-1", status=Message.Status.SENT, event="Shop Updated")
    failed = create_message(
        user_id="shop-2",
        status=Message.Status.FAILED,
        attempts=10,
        last_response_code=400,
        last_error="400 Bad Request: properties.amount must be a number",
        properties={"amount": "12.50", "currency": "EUR"},
    )

    # Log in.
    browser.get(f"{live_server.url}/admin/login/?next=/admin/django_cdp/message/")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(ec.presence_of_element_located((By.ID, "result_list")))
    assert "Delivery is stuck" not in browser.page_source
    shot("delivery-log")

    # Filter failed messages.
    browser.find_element(
        By.CSS_SELECTOR, "#changelist-filter a[href*='status__exact=failed']"
    ).click()
    wait.until(ec.url_contains("status__exact=failed"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1
    shot("failed-messages")

    # Open it: payload and error.
    rows[0].find_element(By.CSS_SELECTOR, "th a").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "pre.cdp-payload")))
    payload = browser.find_element(By.CSS_SELECTOR, "pre.cdp-payload").text
    assert '"amount": "12.50"' in payload
    assert (
        "properties.amount must be a number"
        in browser.find_element(By.CSS_SELECTOR, "pre.cdp-error").text
    )
    shot("message-payload")

    # Requeue it.
    browser.back()
    wait.until(ec.presence_of_element_located((By.ID, "result_list")))
    browser.find_element(By.CSS_SELECTOR, "#result_list input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("requeue")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".messagelist"), "Requeued 1"))
    failed.refresh_from_db()
    assert failed.status == Message.Status.PENDING and failed.attempts == 0
    shot("requeued")

    # The live page shows a new payout without a reload.
    browser.get(f"{live_server.url}/admin/django_cdp/message/live/")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#cdp-live tr.cdp-live-row")))
    marker = browser.execute_script("window.cdpNoReload = true; return 1;")
    assert marker == 1
    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))
    shop = Shop.objects.create(domain="acme.example", email="o@acme.example", plan=plan)
    Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    wait.until(ec.text_to_be_present_in_element((By.ID, "cdp-live"), "Payout Created"))
    assert browser.execute_script("return window.cdpNoReload === true;")
    row = next(
        r
        for r in browser.find_elements(By.CSS_SELECTOR, "#cdp-live tr.cdp-live-row")
        if "Payout Created" in r.text
    )
    row.find_elements(By.TAG_NAME, "td")[1].click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "cdp-live"), '"currency": "EUR"'))
    shot("live-events")

    # Delivery health and its chart.
    browser.get(f"{live_server.url}/admin/django_cdp/message/health/")
    chart = wait.until(ec.presence_of_element_located((By.ID, "cdp-hourly-chart")))
    assert chart.find_elements(By.CSS_SELECTOR, "rect")
    browser.execute_script("arguments[0].scrollIntoView();", chart)
    shot("health-chart")

    assert sorted(p.name for p in SCREENSHOTS.glob("*.png")) == [
        "01-delivery-log.png",
        "02-failed-messages.png",
        "03-message-payload.png",
        "04-requeued.png",
        "05-live-events.png",
        "06-health-chart.png",
    ]
