"""Sign-in links and sessions of the web console, on a fixed clock: signed, short-lived,
single use, bound to the certificate that asked; sessions that end by age, by idling and by
signing out."""

from __future__ import annotations

import pytest

from controller.pki import init_pki, issue_operator
from controller.web.signin import Sessions, SignInLinks
from shared.clock import ManualClock
from shared.errors import WebLoginExpired, WebLoginInvalid, WebLoginUsed
from shared.tls import OperatorRole, TlsFiles


def FixedClock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture(scope="module")
def operator_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root / "pki")
    issue_operator(root / "pki", "olivia", root / "olivia", role=OperatorRole.OPERATOR)
    return TlsFiles.in_dir(root / "olivia", "operator").read().cert


def test_a_link_is_bound_to_the_certificate_and_signs_in_once(operator_pem: bytes) -> None:
    clock = FixedClock()
    links = SignInLinks(clock)
    token, grant = links.issue(operator_pem, 300)
    assert (grant.operator, grant.role) == ("olivia", OperatorRole.OPERATOR)
    assert links.check(token) == grant  # looking does not spend it
    assert links.redeem(token) == grant
    with pytest.raises(WebLoginUsed):
        links.redeem(token)
    with pytest.raises(WebLoginUsed):
        links.check(token)


def test_an_expired_link_is_refused(operator_pem: bytes) -> None:
    clock = FixedClock()
    links = SignInLinks(clock)
    token, _ = links.issue(operator_pem, 60)
    clock.advance(60)
    with pytest.raises(WebLoginExpired):
        links.redeem(token)


@pytest.mark.parametrize(
    "alter",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # the MAC
        lambda t: t.replace(".", ".9", 1),  # a later expiry
        lambda t: "x" + t,  # another id
        lambda t: "not-a-link",
        lambda t: "",
    ],
)
def test_an_altered_or_made_up_link_is_refused(operator_pem: bytes, alter: object) -> None:
    links = SignInLinks(FixedClock())
    token, _ = links.issue(operator_pem, 60)
    assert callable(alter)
    with pytest.raises(WebLoginInvalid):
        links.redeem(alter(token))


def test_a_link_of_another_controller_process_is_refused(operator_pem: bytes) -> None:
    token, _ = SignInLinks(FixedClock()).issue(operator_pem, 60)
    with pytest.raises(WebLoginInvalid):
        SignInLinks(FixedClock()).redeem(token)


def test_sessions_end_by_age_by_idling_and_by_signing_out(operator_pem: bytes) -> None:
    clock = FixedClock()
    links = SignInLinks(clock)
    sessions = Sessions(clock, lifetime=3600, idle=600)
    session = sessions.start(links.redeem(links.issue(operator_pem, 60)[0]))
    assert session.csrf
    assert session.id != session.csrf
    for _ in range(5):  # active: kept past the idle timeout, up to its lifetime
        clock.advance(599)
        assert sessions.get(session.id) is session
    clock.advance(3600)
    assert sessions.get(session.id) is None
    idle = sessions.start(links.redeem(links.issue(operator_pem, 60)[0]))
    clock.advance(600)
    assert sessions.get(idle.id) is None
    out = sessions.start(links.redeem(links.issue(operator_pem, 60)[0]))
    sessions.end(out.id)
    assert sessions.get(out.id) is None
    assert sessions.get(None) is None
    assert sessions.get("made-up") is None
