"""Password checks for checkpassword: crypt(3) strings through the system's libcrypt, and scrypt.

System accounts keep crypt(3) strings in /etc/shadow ($y$ yescrypt, $6$
sha512-crypt, $2b$ bcrypt, ...). The system's own libcrypt (libxcrypt) checks
every format the system writes, so it is called through ctypes (crypt_r,
reentrant) rather than through a library re-implementing a subset (Python's
crypt module is gone in 3.13; passlib/libpass lack yescrypt). The virtual-user
database stores "$scrypt$ln=N,r=R,p=P$salt$key" (standard base64, no padding),
made with hashlib.scrypt.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import os

SCRYPT_PREFIX = "$scrypt$"
SCRYPT_LN = 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_KEY_LEN = 32  # a stored key of any other length is malformed (a shorter one would be a prefix)
_CRYPT_DATA_SIZE = 1 << 18  # larger than any libc's struct crypt_data (glibc's is 131232 bytes)

# By soname, not ctypes.util.find_library: that runs ldconfig in a subprocess,
# which a root process holding a password should not. libxcrypt is .so.1
# (glibc ABI) or .so.2 (its own ABI); old glibc's own libcrypt is .so.1.
_SONAMES = ("libcrypt.so.1", "libcrypt.so.2", "libcrypt.so")

_libcrypt: ctypes.CDLL | None = None


class Unavailable(Exception):
    """No crypt(3) implementation could be loaded (a temporary failure)."""


def _crypt_lib() -> ctypes.CDLL:
    global _libcrypt
    if _libcrypt is None:
        problems = []
        for name in _SONAMES:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                fn = lib.crypt_r
                break
            except (OSError, AttributeError) as e:
                problems.append(str(e))
        else:
            raise Unavailable("unable to load libcrypt: " + "; ".join(problems))
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
        _libcrypt = lib
    return _libcrypt


def crypt(password: bytes, setting: bytes) -> bytes | None:
    """Return crypt(3) of password with setting (a stored hash); None if the setting is refused."""
    lib = _crypt_lib()
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    result = lib.crypt_r(password, setting, data)
    if result is None or result.startswith(b"*"):
        return None  # libxcrypt's failure token ("*0" or "*1")
    return bytes(result)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def scrypt_hash(password: bytes, salt: bytes | None = None, ln: int = SCRYPT_LN) -> str:
    """Return the virtual-user database's hash of password (a fresh random salt unless given)."""
    salt = os.urandom(16) if salt is None else salt
    key = hashlib.scrypt(password, salt=salt, n=1 << ln, r=SCRYPT_R, p=SCRYPT_P, maxmem=1 << 26, dklen=SCRYPT_KEY_LEN)
    return f"{SCRYPT_PREFIX}ln={ln},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def _scrypt_verify(password: bytes, stored: str) -> bool:
    fields = stored[len(SCRYPT_PREFIX):].split("$")
    if len(fields) != 3:
        return False
    try:
        params = dict(kv.split("=", 1) for kv in fields[0].split(","))
        ln, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
        salt, key = _unb64(fields[1]), _unb64(fields[2])
    except (ValueError, KeyError):
        return False
    if _b64(salt) != fields[1] or _b64(key) != fields[2]:
        return False  # not canonical: unused low bits set in the last character
    if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and len(key) == SCRYPT_KEY_LEN):
        return False
    try:
        got = hashlib.scrypt(password, salt=salt, n=1 << ln, r=r, p=p, maxmem=1 << 30, dklen=len(key))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, key)


def verify(password: bytes, stored: str) -> bool:
    """Return True if password matches stored (scrypt or any crypt(3) string); raise Unavailable."""
    if not stored:
        return False  # an empty stored password never matches, as in checkpassword
    if stored.startswith(SCRYPT_PREFIX):
        return _scrypt_verify(password, stored)
    if b"\0" in password:
        return False
    encrypted = crypt(password, stored.encode("latin-1"))
    return encrypted is not None and hmac.compare_digest(encrypted, stored.encode("latin-1"))
