"""The web console in a real browser: headless Chromium (the Debian package) driven by
Playwright, against a real controller, a real agent and the real `coffer` CLI.

An operator signs in with the link `coffer web login` printed, reads the vault's dashboard
and items (a VM whose name is markup shows as text and runs nothing), presses Backup now and
watches the job finish live, restores a disk from the recovery points page, filters jobs,
and reads policies and alerts; what the browser did is the same job, with the same
requester and the same audit entry, as the CLI's. Refused: a link used twice, an expired
or altered link, any page without a session, a POST without the session's CSRF token, and a
reader's Backup now. Screenshots go to the test's output directory (and, with
COFFER_SCREENSHOTS_DIR set, there too: docs/screenshots was made so).
"""

from __future__ import annotations

import os
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from tests.cluster import Cluster, free_port, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHROMIUM = Path("/usr/bin/chromium")
# What the brief for this test names: headless, no sandbox (root), nothing reaching out.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MiB = 1 << 20
VAULT = "north-vault"
# The VM's display name, as its agent reports it: markup, to be shown as text.
HOSTILE_NAME = '<img src=x onerror=alert("xss")>'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("web")
    disk = root / "disk.img"
    disk.write_bytes(os.urandom(24 * MiB))
    web = f'[web]\nlisten = "127.0.0.1:{free_port()}"\n'
    with Cluster(root / "cluster", config=web) as running:
        running.add_agent("app-1", {"root": disk}, service="shop", region="north",
                          name=HOSTILE_NAME)  # fmt: skip
        running.coffer("vault", "create", VAULT, "--region", "north")
        running.coffer("register", "--vault", VAULT, "app-1")
        running.coffer(
            "protect", "--vault", VAULT, "app-1", "--new-policy", "Nightly",
            "--schedule", "daily 03:00 tz=Europe/Berlin", "--daily", "7",
        )  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("web-screenshots")
    yield out
    copy_to = os.environ.get("COFFER_SCREENSHOTS_DIR")
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        for shot in sorted(out.glob("*.png")):
            shutil.copy(shot, Path(copy_to) / shot.name)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: deploy/install.sh installs the Debian package")
    with sync_playwright() as running:
        yield running


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    """A fresh browser: its own profile directory, no cookies. The console's certificate is
    from the controller's private CA, which this profile does not know (checked apart:
    `test_the_console_serves_the_controllers_certificate`)."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        ignore_https_errors=True,
        viewport={"width": 1360, "height": 900},
    )
    context.set_default_timeout(30_000)
    dialogs: list[str] = []
    context.on("page", lambda page: page.on("dialog", lambda d: dialogs.append(d.message)))
    yield context
    context.close()
    assert not dialogs, f"a script ran in the console: {dialogs}"


def login_link(cluster: Cluster, *args: str, tls_dir: Path | None = None) -> dict[str, Any]:
    if tls_dir is None:
        link: dict[str, Any] = cluster.coffer("web", "login", *args)
        return link
    result = cluster.coffer("--tls-dir", str(tls_dir), "web", "login", *args)
    return dict(result)


def sign_in(browser: BrowserContext, cluster: Cluster, tls_dir: Path | None = None) -> Page:
    link = login_link(cluster, tls_dir=tls_dir)
    page = browser.new_page()
    page.goto(link["url"])
    page.click("#sign-in")
    page.wait_for_url("**/vaults")
    return page


def console(cluster: Cluster) -> str:
    return str(login_link(cluster)["console"])


def test_an_operator_signs_in_backs_up_restores_and_filters_jobs(
    cluster: Cluster, browser: BrowserContext, shots: Path
) -> None:
    link = login_link(cluster)
    assert link["operator"] == "admin"
    assert link["role"] == "admin"
    page = browser.new_page()
    page.goto(link["url"])
    assert "signs you in as admin" in " ".join(page.inner_text("main").split())
    page.screenshot(path=shots / "01-sign-in.png")
    page.click("#sign-in")
    page.wait_for_url("**/vaults")
    assert page.inner_text("#operator") == "admin"
    assert VAULT in page.inner_text("#vaults")
    page.screenshot(path=shots / "02-vaults.png")

    page.click(f"text={VAULT}")
    page.wait_for_url(f"**/vaults/{VAULT}")
    assert page.inner_text("#protected-items") == "1"
    page.screenshot(path=shots / "03-dashboard.png", full_page=True)

    page.click("text=Registered items")
    row = page.locator("#items tr[data-vm='app-1']")
    # The agent's name is markup; it reads as text and the browser runs nothing of it.
    assert HOSTILE_NAME in row.inner_text()
    assert page.locator("#items img").count() == 0
    assert "Protected (pending initial backup)" in row.locator(".state").inner_text()
    # The next run at 03:00 in the policy's own time zone.
    assert "T03:00:00+0" in row.locator(".next").inner_text()
    assert "Europe/Berlin" in row.locator(".next").inner_text()
    page.screenshot(path=shots / "04-items.png", full_page=True)

    # Backup now: the job page follows it live (its script polls) until it has ended.
    row.locator("button.backup-now").click()
    page.wait_for_url("**/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    # (A locator, not a function: the console's CSP refuses to evaluate strings, a test's too.)
    expect(page.locator("#status")).to_have_text("Completed", timeout=90_000)
    expect(page.locator("#ended")).not_to_have_text("-")
    assert page.inner_text("#requested-by") == "admin"
    page.screenshot(path=shots / "05-backup-job.png", full_page=True)

    # The CLI sees that very job, asked for by the same operator, audited as a web call.
    shown = cluster.coffer("job", "show", job_id)
    assert (shown["operation"], shown["status"], shown["requested_by"]) == (
        "Backup", "Completed", "admin",
    )  # fmt: skip
    audited = cluster.coffer("audit", "list", "--method", "BackupNow")
    assert audited[0]["who"] == "admin"
    assert audited[0]["peer"].startswith("web ")
    assert audited[0]["arguments"] == {"vault": VAULT, "vms": ["app-1"]}
    rp = shown["recovery_point_id"]

    # Restore from the recovery points page: the same Restore call, the same job.
    page.goto(f"{console(cluster)}/vms/app-1/recovery-points")
    assert rp in page.inner_text("#recovery-points")
    # Each point's last drill is a column (and whether it is in the vault's copy).
    assert "Last drill" in page.inner_text("#recovery-points thead")
    page.screenshot(path=shots / "06-recovery-points.png", full_page=True)
    target = cluster.agents["app-1"].restore_dir / "from-the-browser.img"
    page.fill("#restore input[name=target]", str(target))
    page.click("#restore button")
    page.wait_for_url("**/jobs/*")
    expect(page.locator("#status")).to_have_text("Completed", timeout=90_000)
    assert sha256_file(target) == sha256_file(cluster.agents["app-1"].disks["root"])
    # What it restored where, as `coffer job show` says it.
    assert "new-image" in page.inner_text("#job")
    assert str(target) in page.inner_text("#job")

    # Jobs, filtered as `coffer job list` filters them.
    page.goto(f"{console(cluster)}/jobs")
    choices = page.locator("#job-filters select[name=operation] option").all_inner_texts()
    assert {"Backup", "Restore", "RestoreDrill", "Copy", "Undelete", "VaultUpgrade"} <= set(choices)
    page.select_option("#job-filters select[name=operation]", "Backup")
    page.click("#job-filters button")
    page.wait_for_url("**/jobs?*operation=Backup*")
    operations = page.locator("#jobs tr.job").evaluate_all(
        "rows => rows.map(r => r.dataset.operation)"
    )
    assert operations == ["Backup"]
    page.screenshot(path=shots / "07-jobs-filtered.png", full_page=True)
    page.select_option("#job-filters select[name=operation]", "")
    page.select_option("#job-filters select[name=status]", "Failed")
    page.click("#job-filters button")
    page.wait_for_url("**/jobs?status=Failed*")
    assert page.is_visible("#no-jobs")

    page.goto(f"{console(cluster)}/vaults/{VAULT}/policies")
    assert "daily at 03:00 Europe/Berlin" in page.inner_text("#policy-Nightly")
    page.screenshot(path=shots / "08-policies.png", full_page=True)
    page.goto(f"{console(cluster)}/alerts")
    page.screenshot(path=shots / "09-alerts.png", full_page=True)
    page.goto(f"{console(cluster)}/vaults/{VAULT}")
    assert page.inner_text("#jobs-completed") != "0"
    assert "never drilled" in page.inner_text("#drills")
    assert "This vault copies nowhere." in page.inner_text("#dashboard")
    page.screenshot(path=shots / "10-dashboard-after.png", full_page=True)


def test_a_link_signs_in_once_and_only_while_it_is_fresh(
    cluster: Cluster, browser: BrowserContext, shots: Path
) -> None:
    link = login_link(cluster)["url"]
    page = browser.new_page()
    page.goto(link)
    page.click("#sign-in")
    page.wait_for_url("**/vaults")

    other = browser.new_page()
    reused = other.goto(link)
    assert reused is not None
    assert reused.status == 401
    assert "WebLoginUsed" in other.inner_text("#problem")
    other.screenshot(path=shots / "11-link-used.png")

    expired = login_link(cluster, "--expires", "1")["url"]
    time.sleep(1.5)
    reply = other.goto(expired)
    assert reply is not None
    assert reply.status == 401
    assert "WebLoginExpired" in other.inner_text("#problem")

    fresh = login_link(cluster)["url"]
    altered = fresh[:-3] + ("AAA" if not fresh.endswith("AAA") else "BBB")
    reply = other.goto(altered)
    assert reply is not None
    assert reply.status == 401
    assert "WebLoginInvalid" in other.inner_text("#problem")


def test_nothing_is_served_without_a_session(cluster: Cluster, browser: BrowserContext) -> None:
    page = browser.new_page()
    base = console(cluster)
    for path in ("/vaults", f"/vaults/{VAULT}", "/jobs", "/alerts", "/vms/app-1/recovery-points"):
        reply = page.goto(base + path)
        assert reply is not None, path
        assert reply.status == 401, path
        assert "Not signed in" in page.inner_text("h1")
    state = page.request.get(f"{base}/jobs/abcd/state")
    assert state.status == 401
    post = page.request.post(f"{base}/vaults/{VAULT}/items/app-1/backup", form={"csrf": "x"})
    assert post.status == 401


def test_a_post_without_the_sessions_csrf_token_is_refused(
    cluster: Cluster, browser: BrowserContext
) -> None:
    page = sign_in(browser, cluster)
    base = console(cluster)
    before = len(cluster.coffer("job", "list", "--operation", "Backup"))
    action = f"{base}/vaults/{VAULT}/items/app-1/backup"
    assert page.request.post(action, form={}).status == 403
    assert page.request.post(action, form={"csrf": "not-the-token"}).status == 403
    # Another site's form, with this session's cookie (were it sent) and token: refused too.
    token = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    cross = page.request.post(
        action, form={"csrf": token}, headers={"Origin": "https://elsewhere.example"}
    )
    assert cross.status == 403
    assert len(cluster.coffer("job", "list", "--operation", "Backup")) == before


def test_a_reader_sees_the_vault_but_its_backup_now_is_refused(
    cluster: Cluster, browser: BrowserContext, shots: Path
) -> None:
    reader = cluster.root / "tls-rita"
    if not reader.exists():
        cluster.coffer(
            "pki", "issue-operator", "rita", "--role", "reader", "--dir", str(cluster.pki),
            "--out", str(reader), json_out=False,
        )  # fmt: skip
    page = sign_in(browser, cluster, tls_dir=reader)
    assert page.inner_text("#operator") == "rita"
    page.goto(f"{console(cluster)}/vaults/{VAULT}/items")
    assert page.locator("button.backup-now").count() == 0
    token = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    refused = page.request.post(
        f"{console(cluster)}/vaults/{VAULT}/items/app-1/backup", form={"csrf": token}
    )
    assert refused.status == 403
    assert "InsufficientRole" in refused.text()
    audited = cluster.coffer("audit", "list", "--who", "rita", "--method", "BackupNow")
    assert audited[0]["outcome"] == "InsufficientRole"


def test_cookies_and_headers_of_a_session(cluster: Cluster, browser: BrowserContext) -> None:
    page = sign_in(browser, cluster)
    (cookie,) = browser.cookies()
    assert cookie["name"] == "__Host-coffer-session"
    assert cookie["httpOnly"]
    assert cookie["secure"]
    assert cookie["sameSite"] == "Strict"
    reply = page.goto(f"{console(cluster)}/vaults")
    assert reply is not None
    headers = reply.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "same-origin"
    assert headers["x-content-type-options"] == "nosniff"
    # Signing out ends the session on the server: its cookie is worth nothing after.
    page.click("text=Sign out")
    reply = page.goto(f"{console(cluster)}/vaults")
    assert reply is not None
    assert reply.status == 401


def test_the_console_serves_the_controllers_certificate(cluster: Cluster) -> None:
    base = console(cluster)
    host, port = base.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    context.check_hostname = False  # the controller's names are its own; the chain is the point
    import socket

    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
    assert subject["commonName"] == "coffer-controller"
