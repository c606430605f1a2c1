"""`qmail dkim keygen DOMAIN [SELECTOR]`: make a DKIM key for qmail-dkim and print its DNS record.

    qmail dkim keygen [--home DIR] [--ed25519 | --both] [--force] DOMAIN [SELECTOR]

Writes the private key to control/domainkeys/DOMAIN/SELECTOR (selector
`default` when omitted), where qmail-dkim looks by default, and prints the
TXT record to publish at SELECTOR._domainkey.DOMAIN. RSA-2048 by default
(through the openssl program, as dkimpy's dknewkey); --ed25519 makes an
Ed25519 key instead (RFC 8463, PyNaCl); --both makes the RSA key and an
Ed25519 one beside it, SELECTOR-ed25519, which qmail-dkim signs with too.

Modes: as root the key is root:nofiles 0640 in a root:nofiles 0750
directory: readable by qmaild (qmail-smtpd's qmail-dkim signing for relay
clients) and alias (forwards of alias deliveries, sealed with ARC), by no
one else. Local users' own injections through qmail-dkim cannot read it:
add their group to the directory and the key if they should sign. In a
single-user home, the user's 0600 in 0700.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys

from pyqmail import durable
from pyqmail import home as _home

LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
KEY_GROUP = "nofiles"


class KeygenError(Exception):
    """The key cannot be made; the message says why."""


def rsa_private_key() -> bytes:
    """Return a new RSA-2048 private key in PEM; raise KeygenError without a working openssl program."""
    try:
        proc = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KeygenError(f"unable to run openssl: {e}") from None
    if proc.returncode != 0 or b"PRIVATE KEY" not in proc.stdout:
        raise KeygenError("openssl genpkey failed: " + proc.stderr.decode("utf-8", "replace").strip())
    return proc.stdout


def rsa_public_key(pem: bytes) -> str:
    """Return the base64 DER SubjectPublicKeyInfo of an RSA private key (the p= of its record)."""
    try:
        proc = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=pem,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KeygenError(f"unable to run openssl: {e}") from None
    if proc.returncode != 0 or not proc.stdout:
        raise KeygenError("openssl pkey failed: " + proc.stderr.decode("utf-8", "replace").strip())
    return base64.b64encode(proc.stdout).decode("ascii")


def ed25519_key() -> tuple[bytes, str]:
    """Return a new Ed25519 key as (the base64 seed qmail-dkim reads, the base64 public key for p=)."""
    import nacl.signing

    seed = os.urandom(32)
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    return base64.b64encode(seed) + b"\n", base64.b64encode(public).decode("ascii")


def txt_record(selector: str, domain: str, algorithm: str, public: str) -> str:
    """Return the zone-file line publishing a public key."""
    value = f"v=DKIM1; k={algorithm}; p={public}"
    # TXT character-strings hold 255 bytes each: split, as zone files and resolvers join them.
    parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {parts} )"


def _owner() -> tuple[int, int, int, int]:
    """Return (uid, gid, directory mode, file mode) for key files of this home."""
    inst = _home.install()
    if inst.single:
        return os.getuid(), os.getgid(), 0o700, 0o600
    gid = inst.groups.get(KEY_GROUP, 0)
    return 0, gid, 0o750, 0o640


def write_key(qmail_home: str, domain: str, selector: str, data: bytes, force: bool) -> str:
    """Write data to control/domainkeys/domain/selector with the home's modes; return its path."""
    uid, gid, dmode, fmode = _owner()
    base = os.path.join(qmail_home, "control", "domainkeys")
    directory = os.path.join(base, domain)
    for d, mode in ((base, 0o755), (directory, dmode)):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        if os.geteuid() == 0:
            os.chown(d, 0 if mode == 0o755 else uid, 0 if mode == 0o755 else gid)
        os.chmod(d, mode)
    path = os.path.join(directory, selector)
    if os.path.lexists(path) and not force:
        raise KeygenError(f"{path} exists (--force replaces it)")
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass  # nothing left by an earlier run
    fd = durable.create_excl(tmp, 0o600)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, fmode)
        durable.write_all(fd, data)
        durable.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    durable.fsync_dir(directory)
    return path


def command(argv: list[str]) -> int:
    """Run `qmail dkim`; 0, 100 for usage, 111 for trouble."""
    p = argparse.ArgumentParser(prog=argv[0], description="DKIM keys for qmail-dkim.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = sub.add_parser("keygen", help="make a key in control/domainkeys/DOMAIN/SELECTOR and print its DNS record")
    k.add_argument("--home", default=None, help="the installation (default: $QMAILHOME, else this one's)")
    kind = k.add_mutually_exclusive_group()
    kind.add_argument("--ed25519", action="store_true", help="an Ed25519 key instead of RSA-2048")
    kind.add_argument("--both", action="store_true", help="RSA-2048 at SELECTOR and Ed25519 at SELECTOR-ed25519")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.add_argument("domain", metavar="DOMAIN")
    k.add_argument("selector", nargs="?", default="default", metavar="SELECTOR")
    try:
        args = p.parse_args(argv[1:])
    except SystemExit as e:
        return 0 if e.code == 0 else 100
    from pyqmail.admin.queue import use_home

    qmail_home = use_home(args.home)
    domain = args.domain.lower().rstrip(".")
    labels = domain.split(".")
    if len(labels) < 2 or not all(LABEL.match(x) for x in labels) or not all(
            LABEL.match(x) for x in args.selector.split(".")):
        print(f"{argv[0]}: fatal: not a domain and selector: {args.domain} {args.selector}", file=sys.stderr)
        return 100
    if not os.path.isdir(os.path.join(qmail_home, "control")):
        print(f"{argv[0]}: fatal: no installation in {qmail_home}", file=sys.stderr)
        return 111
    from pyqmail.filter.dkim import ED25519_SUFFIX

    made: list[tuple[str, str, str]] = []
    try:
        if not args.ed25519:
            pem = rsa_private_key()
            made.append((args.selector, "rsa", rsa_public_key(pem)))
            path = write_key(qmail_home, domain, args.selector, pem, args.force)
            print(f"# private key: {path}")
        if args.ed25519 or args.both:
            selector = args.selector + (ED25519_SUFFIX if args.both else "")
            seed, public = ed25519_key()
            made.append((selector, "ed25519", public))
            path = write_key(qmail_home, domain, selector, seed, args.force)
            print(f"# private key: {path}")
    except (KeygenError, OSError) as e:
        print(f"{argv[0]}: fatal: {e}", file=sys.stderr)
        return 111
    print("# publish in DNS:")
    for selector, algorithm, public in made:
        print(txt_record(selector, domain, algorithm, public))
    return 0
