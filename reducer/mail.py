"""Mailing the final report (``[mail]`` in the site settings).

Settings (``reducer.toml``)::

    [mail]
    host = "smtp.example.org"      # empty: no mail
    port = 587
    from = "reducer@example.org"
    to = ["night-team@example.org"]
    starttls = true                # upgrade the connection with STARTTLS (certificate verified)
    cafile = ""                    # CA bundle to verify the server with (default: the system's)
    timeout = 30                   # [s] connecting and each SMTP command

The user name and password come only from the environment, ``REDUCER_SMTP_USER`` and
``REDUCER_SMTP_PASSWORD``: they are never read from a file, printed, logged or written. The
message: the text report as the body, ``finalreport.html`` and the PNG plots attached.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

USER_ENV = "REDUCER_SMTP_USER"
PASSWORD_ENV = "REDUCER_SMTP_PASSWORD"


class MailError(RuntimeError):
    """The report could not be mailed; the message is one line (never holding the password)."""


@dataclass(frozen=True)
class MailSettings:
    """Where and how to send (credentials from the environment, hidden from ``repr``)."""

    host: str
    port: int
    sender: str
    to: tuple
    starttls: bool = False
    cafile: str = ""
    timeout: float = 30.0
    user: str = field(default="", repr=False)
    password: str = field(default="", repr=False)


def mail_settings(settings: dict, environ=None) -> MailSettings | None:
    """The mail settings in force, or ``None`` when mail is not configured (no host).

    Raises
    ------
    MailError
        A host is set but no recipient or sender, or a password without a user.
    """
    env = os.environ if environ is None else environ
    m = settings.get("mail", {}) or {}
    host = str(m.get("host", "") or "").strip()
    if not host:
        return None
    to = tuple(str(t).strip() for t in m.get("to", []) if str(t).strip())
    if not to:
        raise MailError(f"[mail] host is {host} but 'to' lists no recipient")
    sender = str(m.get("from", "") or "").strip()
    if not sender:
        raise MailError("[mail] has no 'from' address")
    user = env.get(USER_ENV, "")
    password = env.get(PASSWORD_ENV, "")
    if password and not user:
        raise MailError(f"${PASSWORD_ENV} is set but ${USER_ENV} is not")
    return MailSettings(host, int(m.get("port", 25)), sender, to, bool(m.get("starttls", False)),
                        str(m.get("cafile", "") or ""), float(m.get("timeout", 30.0)), user, password)


def build_message(cfg: MailSettings, subject: str, text: str, html_path: Path | None,
                  images=()) -> "EmailMessage":  # noqa: F821
    """The report as an :class:`email.message.EmailMessage`: text body, HTML and PNGs attached."""
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = cfg.sender
    msg["To"] = ", ".join(cfg.to)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=cfg.sender.rpartition("@")[2] or None)
    msg.set_content(text)
    if html_path is not None:
        msg.add_attachment(Path(html_path).read_text(encoding="utf-8"), subtype="html",
                           filename=Path(html_path).name)
    for p in images:
        msg.add_attachment(Path(p).read_bytes(), maintype="image", subtype="png",
                           filename=Path(p).name)
    return msg


def _one_line(exc: BaseException, secret: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if secret:
        text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}"


def send(cfg: MailSettings, msg) -> None:
    """Send ``msg`` through ``cfg``'s server (STARTTLS and login when configured).

    Raises
    ------
    MailError
        Connection, TLS, authentication or delivery failure (one line).
    """
    import smtplib
    import ssl
    where = f"{cfg.host}:{cfg.port}"
    try:
        with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout) as smtp:
            smtp.ehlo()
            if cfg.starttls:
                ctx = ssl.create_default_context(cafile=cfg.cafile or None)
                smtp.starttls(context=ctx)
                smtp.ehlo()
            if cfg.user:
                smtp.login(cfg.user, cfg.password)
            refused = smtp.send_message(msg)
    except smtplib.SMTPAuthenticationError as exc:
        raise MailError(f"{where}: authentication as {cfg.user} failed ({exc.smtp_code})") from None
    except (smtplib.SMTPException, ssl.SSLError, OSError) as exc:
        raise MailError(f"{where}: {_one_line(exc, cfg.password)}") from None
    if refused:
        raise MailError(f"{where}: refused recipients: {', '.join(sorted(refused))}")


def send_report(cfg: MailSettings, night, report) -> None:
    """Mail a :class:`reducer.finalreport.FinalReport` of ``night``."""
    msg = build_message(cfg, report.subject, report.text, report.html_path, report.images)
    send(cfg, msg)
