"""qmail-smtpd's SMTP AUTH (RFC 4954): $SMTPAUTH's grammar and the SASL exchanges, no process or socket.

`Policy.from_env` reads $SMTPAUTH as the qmail-authentication patch's man page says:
unset or starting with '-': no AUTH; empty: LOGIN PLAIN; '+cram': LOGIN PLAIN CRAM-MD5;
'cram': CRAM-MD5 only; a leading '!' (as '!', '!cram', '!+cram') also makes AUTH
required before MAIL (530). `Exchange` runs one AUTH command: it returns the
334 prompts to send and, at the end, either a reply (501 malformed, 501 cancelled,
504) or the (user, secret, challenge) to hand to the checkprogram.
"""

from __future__ import annotations

import binascii

from pyqmail.smtpd import replies

LOGIN = b"LOGIN"
PLAIN = b"PLAIN"
CRAM = b"CRAM-MD5"
RESPONSE_MAX = 4096  # bytes of one client response line (base64); longer is 501 malformed


class Policy:
    """Which mechanisms are offered and whether AUTH is required before MAIL."""

    __slots__ = ("mechanisms", "required", "sendercheck")

    def __init__(self, mechanisms: tuple[bytes, ...], required: bool) -> None:
        self.mechanisms = mechanisms
        self.required = required
        self.sendercheck: SenderCheck | None = None  # $SENDERCHECK, set by qmail-smtpd after from_env

    @classmethod
    def from_env(cls, value: bytes | None) -> Policy | None:
        """Return the policy for $SMTPAUTH's value (None: unset), or None for no AUTH."""
        if value is None:
            return None
        v = value.strip().strip(b"'\"")  # the patch's man page allows quoted values
        if v.startswith(b"-"):
            return None
        required = v.startswith(b"!")
        if required:
            v = v[1:]
        v = v.lower()
        if v == b"cram":
            mechs: tuple[bytes, ...] = (CRAM,)
        elif v == b"+cram":
            mechs = (LOGIN, PLAIN, CRAM)
        else:
            mechs = (LOGIN, PLAIN)
        return cls(mechs, required)

    def line(self) -> bytes:
        """Return the EHLO AUTH line's words."""
        return b" ".join(self.mechanisms)


def b64(data: bytes) -> bytes | None:
    """Decode one client response strictly; None if it is not base64."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


class Exchange:
    """One AUTH command's dialogue: feed() each client line until done is set.

    After done: reply is set (a refusal to send), or user/secret/challenge are
    what the checkprogram gets.
    """

    __slots__ = ("mech", "step", "done", "reply", "prompt", "user", "secret", "challenge")

    def __init__(self, policy: Policy, arg: bytes, challenge: bytes) -> None:
        self.done = False
        self.reply = b""
        self.prompt = b""  # what to send now (a 334 line), when not done
        self.user = b""
        self.secret = b""
        self.challenge = b""
        mech, _, initial = arg.strip().partition(b" ")
        self.mech = mech.upper()
        initial = initial.strip()
        self.step = 0
        if self.mech not in policy.mechanisms:
            self._end(replies.AUTH_TYPE)
        elif self.mech == PLAIN:
            if initial:
                self._plain(b"" if initial == b"=" else initial)
            else:
                self.prompt = replies.AUTH_EMPTY
        elif self.mech == LOGIN:
            if initial:
                self._login_user(initial)
            else:
                self.prompt = replies.AUTH_USERNAME
        else:
            if initial:
                self._end(replies.AUTH_INPUT)  # CRAM-MD5 has no initial response
            else:
                self.challenge = challenge
                self.prompt = b"334 " + binascii.b2a_base64(challenge, newline=False) + replies.CRLF

    def _end(self, reply: bytes) -> None:
        self.done = True
        self.reply = reply
        self.prompt = b""

    def feed(self, line: bytes) -> None:
        """Take the client's answer to the prompt (the line without CR LF)."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if line == b"*":
            self._end(replies.AUTH_CANCELLED)
        elif not line or len(line) > RESPONSE_MAX:
            self._end(replies.AUTH_INPUT)
        elif self.mech == PLAIN:
            self._plain(line)
        elif self.mech == LOGIN:
            if self.step == 0:
                self._login_user(line)
            else:
                self._login_password(line)
        else:
            self._cram(line)

    def _plain(self, data: bytes) -> None:
        raw = b64(data) if data else b""
        parts = None if raw is None else raw.split(b"\0")
        if parts is None or len(parts) != 3 or not parts[1]:
            self._end(replies.AUTH_INPUT)
            return
        self.user, self.secret = parts[1], parts[2]  # the authorization identity is ignored, as the patch
        self.done = True

    def _login_user(self, data: bytes) -> None:
        raw = b64(data)
        if not raw or len(data) > RESPONSE_MAX or b"\0" in raw:
            self._end(replies.AUTH_INPUT)
            return
        self.user = raw
        self.step = 1
        self.prompt = replies.AUTH_PASSWORD

    def _login_password(self, data: bytes) -> None:
        raw = b64(data)
        if not raw or b"\0" in raw:
            self._end(replies.AUTH_INPUT)
            return
        self.secret = raw
        self.done = True

    def _cram(self, data: bytes) -> None:
        raw = b64(data)
        user, space, digest = (raw or b"").rpartition(b" ")
        if not space or not user or not digest or b"\0" in raw:  # type: ignore[operator]
            self._end(replies.AUTH_INPUT)
            return
        self.user, self.secret = user, digest
        self.done = True


SENDER_NOT_YOURS = b"553 sorry, that envelope sender is not yours to use (#5.7.1)\r\n"


class SenderCheck:
    """$SENDERCHECK: which envelope senders an authenticated user may give in MAIL FROM.

    Unset or `0`: any. `domain`: an address in the login's domain (the part after its
    '@'), or in one of control/locals for a login without '@' (a system account or a
    bare virtual name). Any other value: the login's own address, the login itself
    when it has an '@', else login@D for each D in control/locals; qmail's extension
    addresses (LOGIN-ANYTHING@D) are the user's too. Domains compare ignoring ASCII
    case, local parts exactly. The null sender <> (bounces, vacation replies) is
    always allowed: it names nobody. Sessions without AUTH are not checked.
    """

    __slots__ = ("domain_only", "locals")

    def __init__(self, domain_only: bool, local_domains: frozenset[bytes]) -> None:
        self.domain_only = domain_only
        self.locals = local_domains

    @classmethod
    def from_env(cls, value: bytes | None, local_domains: list[bytes]) -> SenderCheck | None:
        """Return the check $SENDERCHECK asks for (None: none)."""
        if value is None or value.strip() in (b"0", b""):
            return None
        return cls(value.strip().lower() == b"domain", frozenset(d.lower() for d in local_domains if d))

    def allowed(self, user: bytes, sender: bytes) -> bool:
        """Return whether user (the authenticated login) may use sender (MAIL FROM's address)."""
        if not sender:
            return True
        local, at, domain = sender.rpartition(b"@")
        if not at:
            return False  # an address without a domain names no one's mailbox
        domain = domain.lower()
        ulocal, uat, udomain = user.rpartition(b"@")
        domains = frozenset((udomain.lower(),)) if uat else self.locals
        if domain not in domains:
            return False
        if self.domain_only:
            return True
        name = ulocal if uat else user
        return local == name or local.startswith(name + b"-")
