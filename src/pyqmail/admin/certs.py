"""The TLS certificate of an installation: control/servercert.pem, made and checked.

control/servercert.pem holds the certificate (then its chain) and the
private key in one PEM file, as the qmail-tls patch reads it. `qmail init`
makes a self-signed one with the `openssl` program (make_self_signed);
`qmail doctor` reads it with read_pem and parse_cert, a bounded DER reader
of the few fields it reports (validity, names, issuer == subject), and has
the ssl module (OpenSSL) check that the key belongs to the certificate.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

SERVERCERT = "control/servercert.pem"
CLIENTCERT = "control/clientcert.pem"
DAYS = 3650  # a self-signed certificate nobody verifies: as Debian's snakeoil, ten years
SOON_DAYS = 14  # `qmail doctor` warns this many days before the end
PEM_MAX = 1 << 20  # bytes of a PEM file read: a chain is a few kB
OPENSSL_TIMEOUT = 60.0
CN_MAX = 64  # X.520's upper bound on a common name; longer names go in subjectAltName only
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY")

# DER tags and object identifiers read here.
_SEQUENCE = 0x30
_SET = 0x31
_INTEGER = 0x02
_OID = 0x06
_OCTETS = 0x04
_BOOLEAN = 0x01
_UTCTIME = 0x17
_GENTIME = 0x18
_VERSION = 0xA0  # [0] EXPLICIT
_EXTENSIONS = 0xA3  # [3] EXPLICIT
_DNSNAME = 0x82  # GeneralName [2] IMPLICIT IA5String
_OID_CN = bytes((0x55, 0x04, 0x03))  # 2.5.4.3
_OID_SAN = bytes((0x55, 0x1D, 0x11))  # 2.5.29.17
_STRINGS = (0x0C, 0x13, 0x14, 0x16, 0x1E)  # UTF8, Printable, Teletex, IA5, BMP


class CertError(Exception):
    """A certificate cannot be made or read; the message says why."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What `qmail doctor` reports of one certificate: validity (unix seconds), names, self-signed."""

    not_before: int
    not_after: int
    common_name: str | None
    dns_names: tuple[str, ...]
    self_signed: bool

    def names(self) -> tuple[str, ...]:
        """Return the host names it is for: subjectAltName's, else the common name (RFC 6125)."""
        if self.dns_names:
            return self.dns_names
        return (self.common_name,) if self.common_name else ()


# --- making one -------------------------------------------------------------------------

def openssl_argv(fqdn: str, openssl: str = "openssl", days: int = DAYS) -> list[str]:
    """Return the openssl command writing a self-signed P-256 key and certificate for fqdn to stdout.

    Raise CertError if fqdn is not a plain host name (it goes into -subj and -addext).
    """
    if not _HOSTNAME.match(fqdn) or len(fqdn) > 253:
        raise CertError(f"not a host name for a certificate: {fqdn!r}")
    # Without a CN the subject is a fixed organisation: openssl needs a non-empty one.
    subject = f"/CN={fqdn}" if len(fqdn) <= CN_MAX else "/O=pyqmail self-signed"
    # -config /dev/null: the admin's openssl.cnf (OPENSSL_CONF) changes nothing here.
    return [openssl, "req", "-config", os.devnull, "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", str(days), "-subj", subject,
            "-addext", f"subjectAltName=DNS:{fqdn}", "-addext", "basicConstraints=critical,CA:FALSE",
            "-keyout", "-", "-out", "-"]


def find_openssl() -> str | None:
    """Return the path of the openssl program on $PATH, None if there is none."""
    return shutil.which("openssl")


def make_self_signed(fqdn: str, days: int = DAYS) -> bytes:
    """Return a new self-signed certificate for fqdn and its key, as servercert.pem holds them.

    The key never touches the disk here: openssl writes both to a pipe.
    Raise CertError if the openssl program is missing or fails.
    """
    openssl = find_openssl()
    if openssl is None:
        raise CertError("no openssl program on $PATH")
    argv = openssl_argv(fqdn, openssl, days)
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=OPENSSL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CertError(f"cannot run {openssl}: {e}") from None
    if res.returncode != 0:
        why = res.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CertError(f"{openssl} req failed (exit {res.returncode}): {why[-1] if why else 'no message'}")
    blocks = _PEM.findall(res.stdout)
    certs = [m.group(0) for m in _PEM.finditer(res.stdout) if m.group(1) == b"CERTIFICATE"]
    keys = [m.group(0) for m in _PEM.finditer(res.stdout) if m.group(1).decode() in KEY_LABELS]
    if len(certs) != 1 or len(keys) != 1 or len(blocks) != 2:
        raise CertError(f"{openssl} req wrote no certificate and key")
    # Certificate first, then the key: the order of `cat fullchain.pem privkey.pem`.
    return certs[0] + b"\n" + keys[0] + b"\n"


# --- reading one ------------------------------------------------------------------------

def read_pem(data: bytes) -> list[tuple[str, bytes]]:
    """Return the PEM blocks of data as (label, DER bytes), in order; raise CertError on bad base64."""
    out = []
    for m in _PEM.finditer(data[:PEM_MAX]):
        label = m.group(1).decode("ascii")
        body = m.group(2)
        if b":" in body:  # RFC 1421 headers (Proc-Type: 4,ENCRYPTED): the key is encrypted
            out.append((label, b""))
            continue
        try:
            out.append((label, base64.b64decode(b"".join(body.split()), validate=True)))
        except (binascii.Error, ValueError):
            raise CertError(f"bad base64 in a {label} block") from None
    return out


def key_encrypted(blocks: list[tuple[str, bytes]], data: bytes) -> bool:
    """Return whether the private key in data needs a passphrase (which no qmail program has)."""
    return any(label == "ENCRYPTED PRIVATE KEY" for label, _ in blocks) or b"Proc-Type: 4,ENCRYPTED" in data


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Return (tag, start of contents, end of contents) of the DER element at pos; raise CertError."""
    if pos + 2 > end:
        raise CertError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise CertError("DER tag in high-tag-number form")
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise CertError("bad DER length")
        n = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + n > end:
        raise CertError("DER element past its end")
    return tag, pos, pos + n


def _expect(data: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    got, start, stop = _tlv(data, pos, end)
    if got != tag:
        raise CertError(f"DER tag {got:#x} where {tag:#x} belongs")
    return start, stop


def _time(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Return (unix seconds, next position) of a UTCTime or GeneralizedTime at pos."""
    tag, start, stop = _tlv(data, pos, end)
    text = data[start:stop].decode("ascii", "replace")
    if tag == _UTCTIME and re.fullmatch(r"\d{12}Z", text):
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000  # RFC 5280 4.1.2.5.1
        rest = text[2:]
    elif tag == _GENTIME and re.fullmatch(r"\d{14}Z", text):
        year = int(text[:4])
        rest = text[4:]
    else:
        raise CertError(f"bad certificate time {text!r}")
    mon, day, hour, mi, sec = (int(rest[i:i + 2]) for i in range(0, 10, 2))
    if not (1 <= mon <= 12 and 1 <= day <= 31 and hour < 24 and mi < 60 and sec < 61):
        raise CertError(f"bad certificate time {text!r}")
    return calendar.timegm((year, mon, day, hour, mi, sec, 0, 0, 0)), stop


def _string(data: bytes, start: int, stop: int, tag: int) -> str:
    raw = data[start:stop]
    return raw.decode("utf-16-be", "replace") if tag == 0x1E else raw.decode("utf-8", "replace")


def _common_name(data: bytes, start: int, stop: int) -> str | None:
    """Return the last CN of a Name (RDNSequence) between start and stop, None if it has none."""
    cn = None
    pos = start
    while pos < stop:
        rdn_start, rdn_stop = _expect(data, pos, stop, _SET)
        p = rdn_start
        while p < rdn_stop:
            a_start, a_stop = _expect(data, p, rdn_stop, _SEQUENCE)
            o_start, o_stop = _expect(data, a_start, a_stop, _OID)
            vtag, v_start, v_stop = _tlv(data, o_stop, a_stop)
            if data[o_start:o_stop] == _OID_CN and vtag in _STRINGS:
                cn = _string(data, v_start, v_stop, vtag)
            p = a_stop
        pos = rdn_stop
    return cn


def _dns_names(data: bytes, start: int, stop: int) -> tuple[str, ...]:
    """Return the dNSNames of the subjectAltName among the Extensions between start and stop."""
    seq_start, seq_stop = _expect(data, start, stop, _SEQUENCE)
    pos = seq_start
    while pos < seq_stop:
        e_start, e_stop = _expect(data, pos, seq_stop, _SEQUENCE)
        o_start, o_stop = _expect(data, e_start, e_stop, _OID)
        tag, v_start, v_stop = _tlv(data, o_stop, e_stop)
        if tag == _BOOLEAN:  # critical
            tag, v_start, v_stop = _tlv(data, v_stop, e_stop)
        if tag != _OCTETS:
            raise CertError("extension without a value")
        if data[o_start:o_stop] == _OID_SAN:
            g_start, g_stop = _expect(data, v_start, v_stop, _SEQUENCE)
            names = []
            q = g_start
            while q < g_stop:
                gtag, n_start, n_stop = _tlv(data, q, g_stop)
                if gtag == _DNSNAME:
                    names.append(data[n_start:n_stop].decode("ascii", "replace"))
                q = n_stop
            return tuple(names)
        pos = e_stop
    return ()


def parse_cert(der: bytes) -> CertInfo:
    """Return the validity, names and self-signedness of an X.509 certificate; raise CertError if malformed."""
    end = len(der)
    c_start, c_stop = _expect(der, 0, end, _SEQUENCE)
    t_start, t_stop = _expect(der, c_start, c_stop, _SEQUENCE)
    pos = t_start
    tag, _s, stop = _tlv(der, pos, t_stop)
    if tag == _VERSION:
        pos = stop
    pos = _expect(der, pos, t_stop, _INTEGER)[1]  # serialNumber
    pos = _expect(der, pos, t_stop, _SEQUENCE)[1]  # signature AlgorithmIdentifier
    i_stop = _tlv(der, pos, t_stop)[2]
    issuer = der[pos:i_stop]
    v_start, v_stop = _expect(der, i_stop, t_stop, _SEQUENCE)
    not_before, p = _time(der, v_start, v_stop)
    not_after, _p = _time(der, p, v_stop)
    s_start, s_stop = _expect(der, v_stop, t_stop, _SEQUENCE)
    subject = der[v_stop:s_stop]
    cn = _common_name(der, s_start, s_stop)
    pos = _expect(der, s_stop, t_stop, _SEQUENCE)[1]  # subjectPublicKeyInfo
    names: tuple[str, ...] = ()
    while pos < t_stop:  # issuerUniqueID [1], subjectUniqueID [2], extensions [3]
        tag, e_start, e_stop = _tlv(der, pos, t_stop)
        if tag == _EXTENSIONS:
            names = _dns_names(der, e_start, e_stop)
        pos = e_stop
    return CertInfo(not_before, not_after, cn, names, issuer == subject)


def name_matches(pattern: str, host: str) -> bool:
    """Return whether a certificate name (a leftmost "*." wildcard allowed) covers host (RFC 6125 6.4.3)."""
    p = pattern.rstrip(".").lower()
    h = host.rstrip(".").lower()
    if p.startswith("*."):
        first, dot, rest = h.partition(".")
        return bool(first) and bool(dot) and rest == p[2:]
    return p == h


def key_mismatch(path: str) -> str | None:
    """Return why OpenSSL refuses path's first certificate with its key (a mismatch, no key...), None if it takes them."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_passphrase() -> bytes:
        raise CertError("the key needs a passphrase")

    try:
        ctx.load_cert_chain(path, password=no_passphrase)
    except ssl.SSLError as e:
        return e.reason or str(e)
    except CertError as e:
        return str(e)
    return None


def readable_as(path: str, uid: int, gid: int) -> int:
    """Return 0 if a process with uid and gid (no other groups) can open path for reading, else the errno.

    Runs the open in a child that drops to those ids (pyqmail.privs), so
    directory search rights and ACLs count as they do for the service.
    """
    from pyqmail import privs

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            privs.drop(privs.Credentials(uid, gid, (gid,)))
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            code = min(e.errno or 255, 255)
        except BaseException:
            code = 255
        os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
