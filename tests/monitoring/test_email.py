"""Alert e-mail, for real (issue #16): a real Alertmanager with the rendered config
(monitoring.alertmanager_yml) sends to a local SMTP server (aiosmtpd) that requires STARTTLS, with
a certificate from a test CA, and AUTH. Alertmanager trusts that CA as Go does a system CA
(SSL_CERT_FILE), so the config is production's, unchanged but for the server's address."""

from __future__ import annotations

import email
import email.policy
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from components import config, monitoring
from tests.dns.conftest import free_port
from tests.monitoring.conftest import Daemon, seconds
from tests.postgres.conftest import make_ca

PASSWORD = "CANARY-smtp-password-9f1d"
TIMING = monitoring.Timing(group_wait="1s", group_interval="5s")  # production waits 90 s
SLACK = 10  # seconds: Alertmanager's flush and the SMTP exchange on two shared cores
ALERT = {"labels": {"alertname": "RegionDown", "region": "eu-west", "severity": "warning"},
         "annotations": {"summary": "eu-west is down: every check of it fails"}}


@dataclass
class Mailbox:
    """What the SMTP server saw: each login attempt and each message accepted."""

    logins: list[tuple[str, str, bool]] = field(default_factory=list)  # (login, password, over TLS)
    messages: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        with self.lock:
            self.logins.append((login, password, session.ssl is not None))
        # handled=False: aiosmtpd answers (235, or 535 on a refusal).
        return AuthResult(success=login == "alerts@example.org" and password == PASSWORD, handled=False)

    async def handle_DATA(self, server, session, envelope) -> str:
        with self.lock:
            self.messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos), "tls": session.ssl is not None,
                                  "authenticated": session.authenticated, "content": envelope.content})
        return "250 OK"


class MailServer(Controller):
    """aiosmtpd with the LOGIN prompts real servers send (Postfix, Exim: "Username:"), which
    Alertmanager's LOGIN client requires; aiosmtpd's own are "User Name"."""

    class Server(SMTP):
        AuthLoginUsernameChallenge = "Username:"
        AuthLoginPasswordChallenge = "Password:"

    def factory(self):
        return self.Server(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def smtp(tmp_path):
    """An SMTP server on loopback: STARTTLS required before anything, AUTH required before mail."""
    ca, certs = make_ca(tmp_path, addrs=("127.0.0.1",))
    crt, key = certs["127.0.0.1"]
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(crt, key)
    box = Mailbox()
    server = MailServer(box, hostname="127.0.0.1", port=free_port(), tls_context=tls, require_starttls=True,
                        auth_required=True, auth_require_tls=True, authenticator=box.authenticate)
    server.start()
    yield box, server.port, ca
    server.stop()


def alertmanager(tmp: Path, port: int, ca: Path, password: str) -> Daemon:
    channel = config.EmailAlerts.model_validate({"smtp_host": "127.0.0.1", "smtp_port": port, "from": "alerts@example.org",
                                                 "to": ["ops@example.org", "on-call@example.org"]})
    (tmp / "alertmanager.yml").write_text(monitoring.alertmanager_yml(channel, smtp_password=password, timing=TIMING))
    web = free_port()
    args = monitoring.alertmanager_args(config_file=str(tmp / "alertmanager.yml"), data_dir=str(tmp / "data"),
                                        listen=f"127.0.0.1:{web}", cluster_listen=None)
    return Daemon("prometheus-alertmanager", args, web, tmp / "alertmanager.log", env={"SSL_CERT_FILE": str(ca)})


def post_alert(am: Daemon) -> None:
    httpx.post(f"{am.url}/api/v2/alerts", json=[ALERT], timeout=10).raise_for_status()


def test_an_alert_is_one_email_over_starttls_with_the_password(tmp_path, smtp):
    box, port, ca = smtp
    am = alertmanager(tmp_path, port, ca, PASSWORD)
    try:
        post_alert(am)
        deadline = time.time() + seconds(TIMING.group_wait) + SLACK
        while not box.messages:
            assert time.time() < deadline, f"no e-mail; Alertmanager's log:\n{am.log.read_text()[-3000:]}"
            time.sleep(0.2)
        # One notification per group: a second flush, and the alert posted again, send nothing more.
        post_alert(am)
        time.sleep(2 * seconds(TIMING.group_interval) + 2)
    finally:
        am.stop()

    assert len(box.messages) == 1, [m["to"] for m in box.messages]
    (sent,) = box.messages
    assert sent["from"] == "alerts@example.org"
    assert sent["to"] == ["ops@example.org", "on-call@example.org"]
    assert sent["tls"] and sent["authenticated"]
    assert box.logins == [("alerts@example.org", PASSWORD, True)]  # one login, after STARTTLS
    mail = email.message_from_bytes(sent["content"], policy=email.policy.default)
    assert "[FIRING:1]" in mail["Subject"] and "RegionDown" in mail["Subject"], mail["Subject"]
    assert {str(a) for a in mail["To"].addresses} == {"ops@example.org", "on-call@example.org"}
    body = "".join(part.get_content() for part in mail.walk() if part.get_content_maintype() == "text")
    assert "eu-west is down" in body
    assert PASSWORD not in sent["content"].decode(errors="replace")
    assert PASSWORD not in am.log.read_text()


def test_a_refused_login_sends_nothing_and_logs_no_password(tmp_path, smtp):
    box, port, ca = smtp
    wrong = "CANARY-wrong-password-4c07"
    am = alertmanager(tmp_path, port, ca, wrong)
    try:
        post_alert(am)
        # Refused, Alertmanager tries again: a second login, and still no mail.
        deadline = time.time() + seconds(TIMING.group_wait) + seconds(TIMING.group_interval) + SLACK
        while len(box.logins) < 2:
            assert time.time() < deadline, f"{len(box.logins)} login(s); Alertmanager's log:\n{am.log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        am.stop()
    assert box.messages == []
    assert all(login == ("alerts@example.org", wrong, True) for login in box.logins)
    log = am.log.read_text()
    assert "535 5.7.8 Authentication credentials invalid" in log  # the operator sees why
    assert wrong not in log
