"""Mailing the final report through a real local SMTP server (aiosmtpd)."""
from __future__ import annotations

import email
import email.policy
import os
import socket
import ssl
from pathlib import Path

import pytest

from conftest import run_cli, run_doit
from reportnight import write_small_profile

PASSWORD = "s3cret-Pa55-w0rd-xyzzy"
SHAPE = (96, 128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """aiosmtpd handler keeping every message it is given."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                              "data": envelope.content, "authenticated": session.authenticated,
                              "tls": session.ssl is not None})
        return "250 Message accepted for delivery"


def _authenticator(user: str, password: str):
    from aiosmtpd.smtp import AuthResult, LoginPassword

    def auth(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == user.encode() \
            and auth_data.password == password.encode()
        return AuthResult(success=ok, handled=False)
    return auth


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A night with calibration frames only, its masters built (their previews get mailed)."""
    from reducer.testing import make_night
    root = tmp_path_factory.mktemp("mail")
    sim = make_night(root / "raw" / "20261120", seed=5, filters=("r",), targets=[], standard=False,
                     shape=SHAPE, nbias=3, ndark=0, nflat=3)
    write_small_profile(root / "profiles", SHAPE)
    base = 'instrument = "demo"\nprofiles_dirs = ["profiles"]\nredux = "redux"\nmasters_store = "masters"\n'
    cfg = root / "reducer.toml"
    cfg.write_text(base)
    run_cli("--config", str(cfg), "night", "20261120", "--raw", str(sim.raw_dir), cwd=root)
    nd = root / "redux" / "20261120"
    run_doit(nd, "calib")
    return {"root": root, "dir": nd, "cfg": cfg, "base": base}


@pytest.fixture
def mail_env(monkeypatch):
    monkeypatch.delenv("REDUCER_SMTP_USER", raising=False)
    monkeypatch.delenv("REDUCER_SMTP_PASSWORD", raising=False)
    return monkeypatch


def _configure(night, **mail):
    lines = ["[mail]"]
    for k, v in mail.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list):
            lines.append(f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]")
        else:
            lines.append(f'{k} = "{v}"')
    night["cfg"].write_text(night["base"] + "\n".join(lines) + "\n")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    import ipaddress
    from datetime import datetime, timedelta, timezone
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp / "server.crt", tmp / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def _files_holding(root: Path, secret: bytes) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink() and secret in p.read_bytes():
                out.append(str(p))
    return out


def _check_message(night, msg_bytes: bytes, to: list[str]):
    nd = night["dir"]
    msg = email.message_from_bytes(msg_bytes, policy=email.policy.default)
    assert "20261120" in msg["Subject"] and "demo" in msg["Subject"]
    assert msg["To"] == ", ".join(to) and msg["From"] == "reducer@obs.example"
    body = msg.get_body(preferencelist=("plain",)).get_content()
    assert body.replace("\r\n", "\n") == (nd / "finalreport.txt").read_text()
    att = {a.get_filename(): a for a in msg.iter_attachments()}
    pngs = sorted(p.name for p in (nd / "finalreport").glob("*.png"))
    assert pngs and sorted(n for n in att if n.endswith(".png")) == pngs
    for n in pngs:
        assert att[n].get_content_type() == "image/png"
        assert att[n].get_content() == (nd / "finalreport" / n).read_bytes()
    assert att["finalreport.html"].get_content_type() == "text/html"
    assert att["finalreport.html"].get_content().replace("\r\n", "\n") == (nd / "finalreport.html").read_text()
    return msg


def test_plain_smtp(night, mail_env):
    from aiosmtpd.controller import Controller
    handler = Collector()
    port = _free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    to = ["observer@obs.example", "team@obs.example"]
    try:
        _configure(night, host="127.0.0.1", port=port, **{"from": "reducer@obs.example"}, to=to)
        r = run_doit(night["dir"], "finalreport")
    finally:
        ctl.stop()
    assert f"mailed to {', '.join(to)} via 127.0.0.1:{port}" in r.stdout
    assert len(handler.messages) == 1
    m = handler.messages[0]
    assert m["to"] == to and m["from"] == "reducer@obs.example" and not m["tls"]
    _check_message(night, m["data"], to)


def test_starttls_and_login_never_leak_the_password(night, mail_env, tmp_path):
    """STARTTLS (certificate verified against the configured CA file) and login with the
    credentials from the environment; the password is nowhere in the output or the files."""
    from aiosmtpd.controller import Controller
    crt, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    handler = Collector()
    port = _free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
                     authenticator=_authenticator("observer", PASSWORD), auth_required=True)
    ctl.start()
    mail_env.setenv("REDUCER_SMTP_USER", "observer")
    mail_env.setenv("REDUCER_SMTP_PASSWORD", PASSWORD)
    to = ["night-team@obs.example"]
    try:
        _configure(night, host="127.0.0.1", port=port, **{"from": "reducer@obs.example"}, to=to,
                   starttls=True, cafile=str(crt), timeout=20)
        r = run_doit(night["dir"], "finalreport")
    finally:
        ctl.stop()
    assert "mailed to night-team@obs.example" in r.stdout, r.stdout + r.stderr
    assert len(handler.messages) == 1
    m = handler.messages[0]
    assert m["tls"] and m["authenticated"] and m["to"] == to
    msg = _check_message(night, m["data"], to)
    assert PASSWORD not in r.stdout + r.stderr
    assert PASSWORD not in msg.as_string()
    assert _files_holding(night["root"], PASSWORD.encode()) == []


@pytest.mark.parametrize("case", ["wrong_password", "refused", "no_starttls", "untrusted_cert"])
def test_mail_failure_is_one_line_and_the_report_stays(night, mail_env, tmp_path, case):
    from aiosmtpd.controller import Controller
    port = _free_port()
    ctl = None
    mail = {"host": "127.0.0.1", "port": port, "from": "reducer@obs.example", "to": ["a@obs.example"],
            "timeout": 20}
    crt, key = _self_signed(tmp_path)
    if case != "refused":
        kw = {}
        if case in ("wrong_password", "untrusted_cert"):
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(crt, key)
            kw = {"tls_context": ctx, "require_starttls": True,
                  "authenticator": _authenticator("observer", "the-right-one"), "auth_required": True}
            mail["starttls"] = True
            if case == "wrong_password":
                mail["cafile"] = str(crt)
        else:
            mail["starttls"] = True          # the server offers no STARTTLS
        ctl = Controller(Collector(), hostname="127.0.0.1", port=port, **kw)
        ctl.start()
    mail_env.setenv("REDUCER_SMTP_USER", "observer")
    mail_env.setenv("REDUCER_SMTP_PASSWORD", PASSWORD)
    html = night["dir"] / "finalreport.html"
    before = html.stat().st_mtime_ns if html.exists() else 0
    try:
        _configure(night, **mail)
        r = run_doit(night["dir"], "finalreport")        # the task itself succeeds
    finally:
        if ctl is not None:
            ctl.stop()
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "mail NOT sent" in ln]
    assert len(lines) == 1, r.stdout + r.stderr
    expect = {"wrong_password": "authentication as observer failed (535)",
              "refused": "Connection refused",
              "no_starttls": "STARTTLS extension not supported",
              "untrusted_cert": "CERTIFICATE_VERIFY_FAILED"}[case]
    assert expect in lines[0] and f"127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    assert html.stat().st_mtime_ns > before and (night["dir"] / "finalreport.txt").is_file()
    assert _files_holding(night["root"], PASSWORD.encode()) == []


@pytest.mark.parametrize("mail,env,match", [
    ({"host": "smtp.example", "to": [], "from": "a@b"}, {}, "'to' lists no recipient"),
    ({"host": "smtp.example", "to": ["x@y"], "from": ""}, {}, "no 'from' address"),
    ({"host": "smtp.example", "to": ["x@y"], "from": "a@b"}, {"REDUCER_SMTP_PASSWORD": "p"},
     r"\$REDUCER_SMTP_PASSWORD is set but \$REDUCER_SMTP_USER is not"),
])
def test_mail_settings_errors(mail, env, match):
    from reducer.mail import MailError, mail_settings
    with pytest.raises(MailError, match=match):
        mail_settings({"mail": mail}, environ=env)


def test_mail_settings_from_layers_and_environment():
    from reducer.mail import mail_settings
    assert mail_settings({"mail": {"host": "", "to": ["x@y"]}}, environ={}) is None
    cfg = mail_settings({"mail": {"host": "smtp.example", "port": 587, "to": ["x@y", "z@y"],
                                  "from": "r@y", "starttls": True}},
                        environ={"REDUCER_SMTP_USER": "u", "REDUCER_SMTP_PASSWORD": PASSWORD})
    assert (cfg.host, cfg.port, cfg.to, cfg.starttls, cfg.user) == ("smtp.example", 587, ("x@y", "z@y"), True, "u")
    assert cfg.password == PASSWORD and PASSWORD not in repr(cfg)


def test_mail_keys_in_the_settings_schema(tmp_path):
    """[mail] keys are validated like every other setting (a typo is one clear line)."""
    from reducer.config import SettingsError, load_site
    p = tmp_path / "reducer.toml"
    p.write_text('[mail]\nhost = "smtp.example"\nstarttls = true\ncafile = "/etc/ssl/ca.pem"\ntimeout = 10\n')
    site = load_site(str(p))
    assert site.data["mail"]["timeout"] == 10 and site.data["mail"]["port"] == 25
    p.write_text('[mail]\nhost = "smtp.example"\npasword = "x"\n')
    with pytest.raises(SettingsError, match=r"\[mail\] unknown key 'pasword'"):
        load_site(str(p))
    p.write_text('[mail]\nport = "25"\n')
    with pytest.raises(SettingsError, match=r"'mail.port' must be an integer"):
        load_site(str(p))
