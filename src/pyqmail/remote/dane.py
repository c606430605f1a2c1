"""DANE for SMTP (RFC 7672): which TLSA records count, and whether a server's chain matches them.

TLSA records are asked for at _PORT._tcp.HOST only for a host whose own address records (and,
for an MX host, the MX records) came back DNSSEC-authenticated, and they count only when their
answer is authenticated too (the AD bit of the resolver in $DNSCACHEIP or resolv.conf). Usable
records are DANE-TA(2) and DANE-EE(3), selector Cert(0) or SPKI(1), matching type Full(0),
SHA2-256(1) or SHA2-512(2); PKIX usages 0 and 1 are unusable for SMTP (RFC 7672 section 3.1.3).

DANE-EE matches the server's own certificate; its names and dates are not checked (section
3.1.1). DANE-TA matches a certificate of the server's chain, which must then verify up to it,
in date and with the host's name (section 3.1.2; pyqmail.remote.x509verify).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DANE_TA = 2
DANE_EE = 3


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record: usage, selector, matching type and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and self.mtype in (0, 1, 2)


def parse(text: str) -> Tlsa | None:
    """Return the record of a TLSA rdata text ('3 1 1 ab12...'), None if it is not one."""
    parts = text.split()
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    try:
        data = bytes.fromhex("".join(parts[3:]))
    except ValueError:
        return None
    return Tlsa(int(parts[0]), int(parts[1]), int(parts[2]), data)


def _der(buf: bytes, pos: int) -> tuple[int, int, int]:
    """Return (tag, start of contents, end of contents) of the DER element at pos; ValueError if bad."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag = buf[pos]
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + k > len(buf):
            raise ValueError("bad DER length")
        n = int.from_bytes(buf[pos:pos + k], "big")
        pos += k
    if pos + n > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, pos + n


def spki(cert: bytes) -> bytes:
    """Return the DER SubjectPublicKeyInfo of a DER certificate; ValueError if it cannot be found."""
    tag, start, _ = _der(cert, 0)  # Certificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, end = _der(cert, start)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    fields: list[tuple[int, int, int]] = []
    while pos < end and len(fields) < 7:
        t, s, e = _der(cert, pos)
        fields.append((t, pos, e))
        pos = e
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields) < 6 or fields[5][0] != 0x30:
        raise ValueError("no subjectPublicKeyInfo")
    return cert[fields[5][1]:fields[5][2]]


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(rec: Tlsa, cert: bytes) -> bool:
    """Return whether the DER certificate cert matches rec's selector and matching type."""
    try:
        chosen = cert if rec.selector == 0 else spki(cert)
    except ValueError:
        return False
    return _digest(rec.mtype, chosen) == rec.data


def check(records: list[Tlsa], chain: list[bytes], hosts: list[str]) -> tuple[str | None, str]:
    """Return ('DANE-EE' or 'DANE-TA', '') if chain (leaf first) matches a usable record, else (None, reason)."""
    usable = [r for r in records if r.usable]
    if not chain:
        return None, "no certificate"
    for r in usable:
        if r.usage == DANE_EE and matches(r, chain[0]):
            return "DANE-EE", ""
    reason = "no TLSA record matches the certificate"
    for r in usable:
        if r.usage != DANE_TA:
            continue
        for i, cert in enumerate(chain):
            if not matches(r, cert):
                continue
            from pyqmail.remote import x509verify

            failed = x509verify.verify(chain[:i] or chain[:1], [cert], hosts)
            if failed is None:
                return "DANE-TA", ""
            reason = "chain to the DANE-TA trust anchor: " + failed
    return None, reason
