"""qmail-dkim: sign or verify with DKIM, then queue the message, with qmail-queue's interface.

Installed as $QMAILQUEUE, qmail-dkim reads the message on descriptor 0 and
the envelope on descriptor 1 as qmail-queue(8) does, and hands both to
$DKIMQUEUE (default QMAILHOME/bin/qmail-queue), whose exit code it exits
with; descriptor 6 is that program's own, so its custom error text reaches
the client untouched. What it does to the message first:

- sign (RFC 6376, RFC 8463): when $DKIMSIGN alone is set, or neither
  $DKIMSIGN nor $DKIMVERIFY and the client may relay (RELAYCLIENT or
  AUTHINFO set) or is local (no TCPREMOTEIP: qmail-inject, bounces). Keys:
  control/dkimkeys lines `domain:keyfile[:selector]` for the From domain,
  else $DKIMSIGN (`%` replaced by the From domain; if that file is missing,
  the path with `%` removed), else control/domainkeys/DOMAIN/default. The
  selector is the key file's name unless the line gives one. A PEM key
  signs rsa-sha256, a base64 32-byte seed ed25519-sha256; a file KEY-ed25519
  beside KEY adds an Ed25519 signature. From, To, Cc, Subject and Reply-To
  are oversigned (named in h= once more than present, absent ones too), and
  so are Date, Message-ID, MIME and threading fields when present: a field
  of these added after signing breaks the signature.
- verify: when $DKIMVERIFY alone is set, or neither and the client is
  remote: DKIM signatures, the ARC chain, SPF of the envelope sender and
  $TCPREMOTEIP, DMARC; the results go into an Authentication-Results header
  (RFC 8601) naming control/me, and earlier ones naming control/me go.
  $DKIMVERIFY's letters (indimail's) reject: uppercase permanently,
  lowercase temporarily. control/dmarcbehavior: 0 (default) records only;
  1 rejects a DMARC failure under p=reject; 2 also marks p=quarantine
  failures with an X-DMARC-Quarantine header.
- seal (RFC 8617): when qmail-local forwards (RECIPIENT and DTLINE set),
  with the key of the recipient's domain, else of control/me's.

The next program runs in qmail-dkim's own process (exec, or its main
called for a pyqmail stub), reading the message and envelope from memory
files, so its exit code is qmail-dkim's. Exit codes of qmail-dkim itself:
35 (the $DKIMSIGN key named without `%` does not exist), 53 (no memory
file), 55 (a key cannot be read), 58 (the next program cannot be started),
82 with a D or Z text on descriptor 6 for a rejection (31 or 71 when
descriptor 6 is closed), qmail-queue's 11/54/91 for a bad envelope.
"""

from __future__ import annotations

import os

from pyqmail import durable, spawn
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.queue import envelope as envelope_io

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import NoReturn

FD_MESSAGE = 0
FD_ENVELOPE = 1
FD_ERRSTR = 6
CHUNK = 65536
MAX_SIGNATURES = 8  # DKIM signatures verified per message, the rest ignored (a cost bound)

EXIT_NOKEY = 35
EXIT_PERM = 31
EXIT_WRITE = 53
EXIT_READ = 54
EXIT_CONFIG = 55
EXIT_FORK = 58
EXIT_TEMP = 71
EXIT_BUG = 81
EXIT_CUSTOM = 82

# Signed when present (issue 16): RFC 6376 5.4.1's core, the MIME headers, and RFC 8058's pair.
SIGN_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to",
                b"references", b"mime-version", b"content-type", b"content-transfer-encoding",
                b"content-disposition", b"content-id", b"content-description",
                b"list-unsubscribe", b"list-unsubscribe-post")
# Oversigning (RFC 6376 5.4.2, 8.15): h= names a field once more than the message has it, so that
# an instance added after signing (a second From, a Reply-To the message lacked) breaks the
# signature. Always for the fields a reader trusts; for the others only when present (rspamd's
# (o) and (x) sets); List-* fields are left addable (mailing lists add them and keep signatures).
OVERSIGN_ALWAYS = frozenset((b"from", b"to", b"cc", b"subject", b"reply-to"))
OVERSIGN_PRESENT = frozenset((b"date", b"message-id", b"in-reply-to", b"references", b"mime-version",
                              b"content-type", b"content-transfer-encoding"))
ED25519_SUFFIX = "-ed25519"


def sign_headers(names: list[bytes]) -> list[bytes]:
    """Return h='s field names for a header whose field names (lowercase, in order) are names."""
    out = []
    for h in SIGN_HEADERS:
        n = names.count(h)
        if h in OVERSIGN_ALWAYS or (n and h in OVERSIGN_PRESENT):
            n += 1
        elif n:
            n = 1
        out += [h] * n
    return out
AR_NAME = b"Authentication-Results"


class Fatal(Exception):
    """Exit with code, after saying text on stderr."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Reject(Exception):
    """Refuse the message with a D (permanent) or Z (temporary) text for descriptor 6."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


# The message: its header fields, unfolded, and its body.

def split_header(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Return the header fields of message as (name, raw field with its newline) and where they end.

    message[offset:] is the blank line and the body (or the body alone when a
    line that is not a header field ends the header).
    """
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        stop = end if nl < 0 else nl + 1
        line = message[pos:stop]
        if line in (b"\n", b"\r\n"):
            return fields, pos
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            colon = line.find(b":")
            if colon <= 0:
                return fields, pos  # not a header field: the body starts here
            fields.append((line[:colon].strip().lower(), line))
        pos = stop
    return fields, end


def header_value(raw: bytes) -> bytes:
    """Return a raw header field's value, unfolded."""
    value = raw.split(b":", 1)[1]
    return b" ".join(value.split())


_ATEXT = rb"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_SIMPLE_FROM = None  # compiled on first use: re.Pattern[bytes]


def _simple_address(value: bytes) -> bytes | None:
    """Return the address of a From value `local@domain` or `Name <local@domain>`, None if it is anything else.

    What nearly every From is, read without email.utils (0.2 ms of a fresh
    process's copied pages per message): a display name of atext words, a
    local part of atext and dots, a domain of letters, digits, dots and
    hyphens. Anything else goes to getaddresses.
    """
    global _SIMPLE_FROM
    if _SIMPLE_FROM is None:
        import re

        addr = rb"[" + _ATEXT + rb".]+@[A-Za-z0-9.-]+"
        _SIMPLE_FROM = re.compile(rb"[" + _ATEXT + rb" ]*<(" + addr + rb")>|(" + addr + rb")")
    m = _SIMPLE_FROM.fullmatch(value)
    if m is None:
        return None
    return m.group(1) or m.group(2)


def from_domain(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Return the lowercased domain of the first From: address, None if there is none."""
    for name, raw in fields:
        if name == b"from":
            value_bytes = header_value(raw)
            simple = _simple_address(value_bytes)
            if simple is not None:
                return simple.rpartition(b"@")[2].decode().lower().rstrip(".") or None
            from email.utils import getaddresses

            value = value_bytes.decode("utf-8", "replace")
            for _display, addr in getaddresses([value]):
                if "@" in addr:
                    domain = addr.rpartition("@")[2].strip().lower().rstrip(".")
                    return domain or None
            return None
    return None


# Keys.

class Key:
    """A private key for one domain and selector."""

    __slots__ = ("domain", "selector", "data", "algorithm")

    def __init__(self, domain: str, selector: str, data: bytes) -> None:
        self.domain = domain
        self.selector = selector
        self.data = data
        self.algorithm = b"rsa-sha256" if data.lstrip().startswith(b"-----BEGIN") else b"ed25519-sha256"


def _read_key(path: str, domain: str, selector: str | None) -> Key | None:
    """Return the Key in path, None if path does not exist; raise Fatal(55) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Fatal(EXIT_CONFIG, f"unable to read key {path}: {e.strerror}") from None
    return Key(domain, selector or os.path.basename(path), data)


def _with_companion(path: str, domain: str, selector: str | None) -> list[Key]:
    keys = []
    for p, sel in ((path, selector), (path + ED25519_SUFFIX, selector + ED25519_SUFFIX if selector else None)):
        key = _read_key(p, domain, sel)
        if key is not None:
            keys.append(key)
    return keys


def find_keys(domain: str, env: Mapping[str, str], *, explicit: bool = True) -> list[Key]:
    """Return the keys that sign for domain (control/dkimkeys, $DKIMSIGN, the default); raise Fatal."""
    from pyqmail import control

    try:
        lines = control.read_lines("dkimkeys") or []
    except control.ControlError as e:
        raise Fatal(EXIT_CONFIG, str(e)) from None
    keys: list[Key] = []
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 2 and fields[0].strip().lower() == domain:
            selector = fields[2].strip() if len(fields) >= 3 and fields[2].strip() else None
            keys += _with_companion(fields[1].strip(), domain, selector)
    if keys:
        return keys
    sign = env.get("DKIMSIGN")
    if sign and explicit:
        keys = _with_companion(sign.replace("%", domain), domain, None)
        if not keys and "%" in sign:
            keys = _with_companion(sign.replace("%", ""), domain, None)
        if not keys and "%" not in sign:
            raise Fatal(EXIT_NOKEY, f"private key {sign} does not exist")
        return keys
    return _with_companion(os.path.join(_home.home(), "control", "domainkeys", domain, "default"), domain, None)


# dkimpy, and OpenSSL for its slow step.

_fast_rsa_installed = False


def _install_fast_rsa() -> None:
    """Have dkimpy's RSA signatures made by OpenSSL (pyqmail.filter.rsa) for keys loaded there.

    dkimpy looks RSASSA_PKCS1_v1_5_sign up in its module at each signature;
    the replacement signs with OpenSSL when the key is loaded, else calls
    dkimpy's own (pure Python, 10x slower). Both give the same bytes:
    PKCS #1 v1.5 signatures are deterministic.
    """
    global _fast_rsa_installed
    if _fast_rsa_installed:
        return
    _fast_rsa_installed = True
    import dkim

    pure = getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None)
    if pure is None:
        return

    def sign(hashed: object, private_key: dict[str, int]) -> bytes:
        from pyqmail.filter import rsa

        digest = hashed.digest()  # type: ignore[attr-defined]
        got = rsa.sign_digest(private_key["modulus"], digest) if len(digest) == 32 else None
        return got if got is not None else bytes(pure(hashed, private_key))

    dkim.RSASSA_PKCS1_v1_5_sign = sign


def sign_message(message: bytes, keys: list[Key], fields: list[tuple[bytes, bytes]]) -> bytes:
    """Return the DKIM-Signature header fields of keys over message (relaxed/relaxed).

    pyqmail.filter.dkimsign signs (dkimpy's bytes at a third of its cost);
    dkimpy signs what that declines: a header dkimpy reads its own way, a
    key OpenSSL or PyNaCl cannot load (dkimpy then gives the verdict).
    """
    from pyqmail.filter import dkimsign

    present = {name for name, _raw in fields}
    include = sign_headers([name for name, _raw in fields])
    parsed = dkimsign.parse(message) if b"from" in present else None
    signer = dkimsign.Signer(parsed[0], parsed[1], include) if parsed is not None else None
    out = b""
    for key in keys:
        got = signer.sign(key.algorithm, key.domain.encode(), key.selector.encode(), key.data) if signer else None
        if got is None:
            got = _sign_dkimpy(message, key, include)
            if got is None:
                return b""
        out += got
    return out


def _sign_dkimpy(message: bytes, key: Key, include: list[bytes]) -> bytes | None:
    """Return dkimpy's DKIM-Signature field of key over message, None if dkimpy cannot parse message; raise Fatal."""
    import dkim
    import dkim.crypto

    from pyqmail.filter import arc, rsa

    _install_fast_rsa()
    if key.algorithm == b"rsa-sha256":
        try:
            parsed = dkim.crypto.parse_pem_private_key(key.data)
            rsa.load_key(key.data, parsed["modulus"])
        except Exception:  # noqa: BLE001 - dkimpy reports a bad key below, as KeyFormatError
            pass
    try:
        signer = dkim.DKIM(message, logger=arc._quiet(), linesep=b"\n")
    except dkim.DKIMException as e:
        os.write(2, f"qmail-dkim: warning: message not signed: {e}\n".encode("utf-8", "replace"))
        return None
    try:
        return bytes(signer.sign(key.selector.encode(), key.domain.encode(), key.data,
                                 signature_algorithm=key.algorithm, canonicalize=(b"relaxed", b"relaxed"),
                                 include_headers=include))
    except (dkim.DKIMException, ValueError) as e:  # binascii.Error (a ValueError): a PEM whose base64 is bad
        raise Fatal(EXIT_CONFIG, f"unable to sign with key {key.selector} for {key.domain}: {e}") from None


class DnsRecorder:
    """dkimpy's dnsfunc over pyqmail's resolver, remembering whether a lookup failed or found nothing."""

    def __init__(self, env: Mapping[str, str]) -> None:
        from pyqmail.filter import dmarc

        self.lookup = dmarc.lookup_txt(env)
        self.status: dict[bytes, int] = {}

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        from pyqmail.filter import dmarc

        status, texts = self.lookup(name.decode("ascii", "replace").rstrip("."))
        self.status[name.rstrip(b".").lower()] = status
        if status != dmarc.OK or not texts:
            return None
        for text in texts:
            if text.lstrip().startswith("v=DKIM1"):
                return text.encode("latin-1")
        return texts[0].encode("latin-1")


class DkimResult:
    """One signature's outcome: result (pass/fail/permerror/temperror/neutral) and its tags."""

    __slots__ = ("result", "domain", "selector", "algorithm", "b", "letter")

    def __init__(self, result: str, domain: str, selector: str, algorithm: str, b: str, letter: str) -> None:
        self.result = result
        self.domain = domain
        self.selector = selector
        self.algorithm = algorithm
        self.b = b
        self.letter = letter  # DKIMVERIFY's letter for this outcome

    def ar(self) -> str:
        if not self.domain:
            return f"dkim={self.result}"
        text = f"dkim={self.result} header.d={self.domain} header.s={self.selector} header.a={self.algorithm}"
        return text + (f" header.b={self.b}" if self.b else "")


def _tag(sig: bytes, name: bytes) -> str:
    for part in sig.split(b";"):
        k, eq, v = part.partition(b"=")
        if eq and k.strip() == name:
            return b"".join(v.split()).decode("ascii", "replace")
    return ""


def verify_dkim(message: bytes, fields: list[tuple[bytes, bytes]], dnsfunc: DnsRecorder) -> list[DkimResult]:
    """Return the outcome of each DKIM-Signature of message (at most MAX_SIGNATURES)."""
    import dkim

    from pyqmail.filter import arc

    sigs = [raw for name, raw in fields if name == b"dkim-signature"][:MAX_SIGNATURES]
    out: list[DkimResult] = []
    if not sigs:
        return out
    try:
        verifier = dkim.DKIM(message, logger=arc._quiet())
    except dkim.DKIMException:
        return [DkimResult("permerror", "", "", "", "", "H")]  # a header dkimpy cannot parse
    for idx, raw in enumerate(sigs):
        value = raw.split(b":", 1)[1]
        d, s, a, b = _tag(value, b"d"), _tag(value, b"s"), _tag(value, b"a"), _tag(value, b"b")[:8]
        keyname = f"{s}._domainkey.{d}".lower().encode()
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.ValidationError as e:
            body = "body hash" in str(e)
            out.append(DkimResult("fail", d, s, a, b, "U" if body else "I"))
            continue
        except dkim.DKIMException:
            out.append(DkimResult("permerror", d, s, a, b, "H"))
            continue
        status = dnsfunc.status.get(keyname)
        if ok:
            out.append(DkimResult("pass", d, s, a, b, "A"))
        elif status == 1:
            out.append(DkimResult("temperror", d, s, a, b, "P"))
        elif status == 2:
            out.append(DkimResult("permerror", d, s, a, b, "Q"))
        else:
            out.append(DkimResult("fail", d, s, a, b, "I"))
    return out


# The modes.

def trusted(env: Mapping[str, str]) -> bool:
    """Return whether the client may have its mail signed: a relay client, authenticated, or local.

    Not TCPREMOTEINFO: tcpserver sets it from the client's own ident
    answer, which anyone can make say anything.
    """
    return "RELAYCLIENT" in env or "AUTHINFO" in env or "TCPREMOTEIP" not in env


def mode(env: Mapping[str, str]) -> str:
    """Return what qmail-dkim does for this environment: seal, sign or verify."""
    if "RECIPIENT" in env and "DTLINE" in env:
        return "seal"
    sign, verify = "DKIMSIGN" in env, "DKIMVERIFY" in env
    if sign != verify:
        return "sign" if sign else "verify"
    return "sign" if trusted(env) else "verify"


def _me() -> str:
    from pyqmail import control

    return control.me() or "localhost"


def _helo(fields: list[tuple[bytes, bytes]]) -> str:
    """Return the HELO name in the top Received line qmail-smtpd wrote, '' if none.

    qmail-smtpd writes `from HOST (HELO NAME)` when the client's HELO name
    differs from HOST, else `from HOST`; HOST `unknown` names nothing.
    """
    for name, raw in fields:
        if name == b"received":
            words = header_value(raw).split()
            if len(words) < 2 or words[0].lower() != b"from":
                return ""
            if len(words) >= 4 and words[2] == b"(HELO" and words[3].endswith(b")"):
                return words[3][:-1].decode("ascii", "replace")
            return "" if words[1] == b"unknown" else words[1].decode("ascii", "replace")
    return ""


def _dmarc_behavior() -> int:
    from pyqmail import control

    return control.read_int("dmarcbehavior", 0)


def verify(message: bytes, sender: bytes, env: Mapping[str, str],
           sample: Callable[[], int] | None = None) -> bytes:
    """Return message with this host's Authentication-Results header on top; raise Reject."""
    from pyqmail.filter import arc, dmarc

    me = _me()
    fields, body_at = split_header(message)
    # RFC 8601 5: a header naming this host that arrived with the message is forged.
    mine = me.lower().encode()
    kept = [(n, raw) for n, raw in fields
            if not (n == b"authentication-results"
                    and header_value(raw).split(b";", 1)[0].strip().lower() == mine)]
    if len(kept) != len(fields):
        message = b"".join(raw for _n, raw in kept) + message[body_at:]
        fields = kept
    dnsfunc = DnsRecorder(env)
    ip = env.get("TCPREMOTEIP", "")
    helo = _helo(fields) or env.get("TCPREMOTEHOST", "")
    spf_result, spf_domain = dmarc.spf_check(ip, sender.decode("utf-8", "replace"), helo, env)
    dkims = verify_dkim(message, fields, dnsfunc)
    arc_result = arc.verify(message, dnsfunc)
    author = from_domain(fields)
    parts = [me]
    if sender:
        parts.append(f"spf={spf_result} smtp.mailfrom={sender.decode('utf-8', 'replace')}")
    elif helo:
        parts.append(f"spf={spf_result} smtp.helo={helo}")
    else:
        parts.append(f"spf={spf_result}")
    parts += [d.ar() for d in dkims] or ["dkim=none"]
    result = None
    if author:
        result = dmarc.evaluate(author, spf_result, spf_domain,
                                [d.domain for d in dkims if d.result == "pass"], dnsfunc.lookup, sample)
        parts.append(result.ar())
    else:
        parts.append("dmarc=none")
    parts.append(f"arc={arc_result}")
    header = AR_NAME + b": " + ";\n\t".join(parts).encode("utf-8") + b"\n"
    _check_letters(env.get("DKIMVERIFY", ""), dkims)
    extra = b""
    if result is not None and result.result == "fail":
        behavior = _dmarc_behavior()
        if behavior >= 1 and result.disposition == "reject":
            raise Reject(f"DDMARC policy of {result.from_domain} rejects this message (#5.7.1)".encode())
        if behavior >= 2 and result.disposition == "quarantine":
            extra = f"X-DMARC-Quarantine: p={result.policy} header.from={result.from_domain}\n".encode()
    return extra + header + message


VERIFY_TEXT = {
    "A": "DKIM signature verified",
    "H": "DKIM signature has bad syntax",
    "I": "DKIM signature does not verify",
    "P": "temporary DNS failure fetching a DKIM key",
    "Q": "no DKIM key in DNS for a signature",
    "S": "message has no DKIM signature",
    "T": "message has no valid DKIM signature",
    "U": "DKIM body hash does not match",
}


def _check_letters(letters: str, dkims: list[DkimResult]) -> None:
    """Raise Reject if an outcome's letter is in $DKIMVERIFY (uppercase permanent, lowercase temporary)."""
    if not letters:
        return
    happened = {d.letter for d in dkims}
    if not dkims:
        happened.add("S")
    elif not any(d.result == "pass" for d in dkims):
        happened.add("T")
    for ch in letters:
        if ch.upper() in happened:
            text = VERIFY_TEXT.get(ch.upper(), "DKIM verification failed")
            if ch.isupper():
                raise Reject(f"D{text} (#5.7.20)".encode())
            raise Reject(f"Z{text} (#4.7.5)".encode())


def seal(message: bytes, env: Mapping[str, str]) -> bytes:
    """Return message with an ARC set on top, sealed by the forwarding domain's RSA key (if any)."""
    from pyqmail.filter import arc

    me = _me()
    domains = [env.get("RECIPIENT", "").rpartition("@")[2].lower(), me.lower()]
    for domain in domains:
        if not domain:
            continue
        keys = [k for k in find_keys(domain, env, explicit=False) if k.algorithm == b"rsa-sha256"]
        if keys:
            key = keys[0]
            _install_fast_rsa()
            from pyqmail.filter import rsa

            try:
                import dkim.crypto

                rsa.load_key(key.data, dkim.crypto.parse_pem_private_key(key.data)["modulus"])
            except Exception:  # noqa: BLE001 - dkimpy refuses a bad key in seal below
                pass
            return arc.seal(message, key.selector.encode(), key.domain.encode(), key.data, me.encode()) + message
    return message


# Descriptors.

def _read_all(fd: int) -> bytes:
    """Return all of fd: dkimpy signs and verifies a message held in memory."""
    buf = bytearray()
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except InterruptedError:
            continue
        except OSError:
            raise Fatal(EXIT_READ, "unable to read the message") from None
        if not chunk:
            return bytes(buf)
        buf += chunk


def envelope_sender(envelope: bytes) -> bytes:
    """Return the sender of an envelope (F record); b'' if it has none."""
    if envelope[:1] != b"F":
        return b""
    return envelope[1:].split(b"\0", 1)[0]


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def queue(message: bytes, envelope: bytes, env: Mapping[str, str]) -> NoReturn:
    """Become $DKIMQUEUE or QMAILHOME/bin/qmail-queue with message on 0 and envelope on 1; raise Fatal if it cannot start.

    Both are in memory files (memfd), so the next program runs in this
    process (pyqmail.spawn.become: exec, or its main called for one of our
    stubs) and no second process is made per message; its exit code is
    this process's and descriptor 6 is ours, so both reach our caller
    untouched.
    """
    prog = env.get("DKIMQUEUE") or os.path.join(_home.home(), "bin", "qmail-queue")
    errstr = _fd_open(FD_ERRSTR)
    try:
        mfd = os.memfd_create("qmail-dkim-message", os.MFD_CLOEXEC)
        efd = os.memfd_create("qmail-dkim-envelope", os.MFD_CLOEXEC)
        for fd, data in ((mfd, message), (efd, envelope)):
            durable.write_all(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
    except OSError as e:
        raise Fatal(EXIT_WRITE, f"unable to hold the message: {e.strerror}") from None
    fds = {0: mfd, 1: efd, 2: 2}
    if errstr:
        fds[FD_ERRSTR] = FD_ERRSTR
    try:
        spawn.become(prog, [prog], env=dict(env), fds=fds)
    except OSError as e:
        raise Fatal(EXIT_FORK, f"unable to run {prog}: {e.strerror}") from None


def _reject(text: bytes) -> int:
    """Write text to descriptor 6 and return 82; 31/71 when descriptor 6 is closed."""
    try:
        durable.write_all(FD_ERRSTR, text)
        return EXIT_CUSTOM
    except OSError:
        return EXIT_PERM if text[:1] == b"D" else EXIT_TEMP


def filter_message(message: bytes, envelope: bytes, env: Mapping[str, str]) -> bytes:
    """Return the message as qmail-dkim passes it on; raise Fatal or Reject."""
    what = mode(env)
    if what == "seal":
        return seal(message, env)
    if what == "verify":
        return verify(message, envelope_sender(envelope), env)
    fields, _body = split_header(message)
    domain = from_domain(fields)
    if domain is None:
        return message
    keys = find_keys(domain, env)
    if not keys:
        return message
    return sign_message(message, keys, fields) + message


def preload() -> None:
    """Import what qmail-dkim uses in tcpserver's parent, so that no message pays for it.

    A server whose every client is signed for never verifies: RELAYCLIENT
    in its own environment (tcprules can add variables for a client, not
    take them away), or $DKIMSIGN without $DKIMVERIFY. It then loads only
    the signer (pyqmail.filter.dkimsign, OpenSSL, PyNaCl): dkimpy, dnspython,
    pyspf and the public suffix list would add 13 MB to every child's
    address space, which two forks per message copy the page tables of and
    tear down. A client that tcprules gives $DKIMVERIFY is then verified
    with those imported per message: slower, the same result.
    """
    from pyqmail import control  # noqa: F401
    from pyqmail.filter import dkimsign, rsa  # noqa: F401

    verifies = mode({**os.environ, "TCPREMOTEIP": "0.0.0.0"}) != "sign"
    names = ["nacl.signing", "nacl.encoding"]
    if verifies:
        names += ["dkim", "dkim.crypto", "pyqmail.filter.arc", "pyqmail.filter.dmarc", "pyqmail.remote.mx",
                  "authres", "spf", "email.utils", "dns.resolver", "dns.nameserver", "dns.flags", "dns.exception",
                  "dns.name"]
    for name in names:
        try:
            __import__(name)
        except ImportError:
            pass  # safe: the child imports again and reports the failure
    if verifies:
        from pyqmail.filter import arc

        _install_fast_rsa()
        arc._quiet()
    # The next program's module too: every message starts it from here.
    stub = spawn.read_stub(os.environ.get("DKIMQUEUE") or os.path.join(_home.home(), "bin", "qmail-queue"))
    if stub is not None:
        try:
            __import__(stub.module)
        except ImportError:
            pass  # safe: spawn imports it again in the child and reports the failure
    if rsa.available():
        _warm_keys()
    if verifies:
        try:
            from pyqmail.filter import dmarc

            dmarc.org_domain("example.com")
        except ImportError:
            pass  # safe: as above
    # What preload made stays out of the children's collections: a collection in a child would
    # touch, and so copy, every page of dkimpy's, dnspython's and PyNaCl's objects.
    import gc

    gc.freeze()


WARM_KEYS_MAX = 64
WARM_SIGNS = 10


def _warm_keys() -> None:
    """Load the RSA keys this user can read into OpenSSL and sign once with each (Ed25519 keys into PyNaCl).

    Run in tcpserver's parent (after it took its uid): the children find
    the key loaded, its Montgomery and blinding values made (6 ms each, per
    process otherwise). A child still reads its key file per message and
    looks the key up by its text, so a replaced key takes effect at once.
    """
    paths: list[str] = []
    top = os.path.join(_home.home(), "control", "domainkeys")
    try:
        for domain in sorted(os.listdir(top)):
            try:
                paths += [os.path.join(top, domain, n) for n in sorted(os.listdir(os.path.join(top, domain)))]
            except OSError:
                continue  # safe: a directory this user cannot read holds no key it could sign with
    except OSError:
        pass  # safe: no control/domainkeys, no keys to warm
    from pyqmail import control

    try:
        paths += [line.split(":")[1].strip() for line in control.read_lines("dkimkeys") or [] if ":" in line]
    except control.ControlError:
        pass  # safe: qmail-dkim reads control/dkimkeys again per message and reports there
    from pyqmail.filter import dkimsign

    warm: list[Key] = []
    for path in paths[:WARM_KEYS_MAX]:
        try:
            with open(path, "rb") as f:
                data = f.read(65536)
        except OSError:
            continue  # safe: not a readable key: the children read it themselves and report
        key = Key("warm.invalid", "warm", data)
        # Found again by its PEM text (dkimsign, and rsa.load_key for ARC seals through dkimpy);
        # an Ed25519 seed's PyNaCl key likewise.
        if dkimsign._sign_digest(key.algorithm, data, bytes(32)) is not None and key.algorithm == b"rsa-sha256":
            warm.append(key)
    # CPython specialises a function's code after 8 calls: made here, those pages stay shared.
    import base64

    warm = warm[:1] + [Key("warm.invalid", "warm", base64.b64encode(os.urandom(32)))]  # and Ed25519's path
    message = b"From: Warm <a@warm.invalid>\nSubject: warm\n\nwarm\n"
    fields, _ = split_header(message)
    envelope = b"Fa@warm.invalid\0Tb@warm.invalid\0\0"
    for _ in range(WARM_SIGNS):
        sign_message(message, warm, fields)
        # And the rest of a message's path up to the next program (reading both descriptors, the
        # mode, the keys of a domain that has none): each call of a function not yet specialised
        # writes to its code object, and in a child that write copies the page.
        for data, read in ((message, _read_all), (envelope, envelope_io.read_envelope)):
            r, w = os.pipe()
            try:
                os.write(w, data)
                os.close(w)
                w = -1
                read(r)
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
        filter_message(message, envelope, {"RELAYCLIENT": "", "TCPREMOTEIP": "127.0.0.1"})


@program("qmail-dkim", crash=EXIT_BUG)
def main(argv: list[str]) -> int:
    """Filter the message on descriptor 0 (envelope on 1) and queue it with the next program."""
    try:
        message = _read_all(FD_MESSAGE)
        try:
            sender, recipients = envelope_io.read_envelope(FD_ENVELOPE)
        except envelope_io.Exit as e:
            return e.code  # qmail-queue's own exit for this envelope (11, 54, 91)
        envelope = envelope_io.envelope_bytes(sender, recipients)
        env = dict(os.environ)
        try:
            out = filter_message(message, envelope, env)
        except Reject as r:
            return _reject(r.text)
        queue(out, envelope, env)
    except Fatal as f:
        os.write(2, f"qmail-dkim: fatal: {f.text}\n".encode("utf-8", "replace"))
        return f.code
