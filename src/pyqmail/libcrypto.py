"""Where the libcrypto the ssl module is linked with lives, for the few calls ssl does not offer.

pyqmail.remote.x509verify (chain checks after a handshake: DANE-TA, MTA-STS
testing) and pyqmail.filter.rsa (DKIM's RSA signatures at OpenSSL's speed)
reach it through ctypes. Using the very library ssl loaded keeps one OpenSSL
in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def path() -> str | None:
    """Return the path of the libcrypto ssl loaded, else the linker's libcrypto, else None."""
    import _ssl  # noqa: F401 - loads the libcrypto the ssl module is linked with

    try:
        with open("/proc/self/maps", encoding="latin-1") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and "/libcrypto" in parts[5]:
                    return parts[5].strip()
    except OSError:
        pass  # safe: no /proc, so ask the linker's search below
    return ctypes.util.find_library("crypto")


def load(signatures: dict[str, tuple[object, list[object]]]) -> ctypes.CDLL | None:
    """Return libcrypto with each named function's restype and argtypes set; None if any is missing."""
    where = path()
    if where is None:
        return None
    try:
        lib = ctypes.CDLL(where)
        for name, (res, args) in signatures.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
    except (OSError, AttributeError):
        return None  # no libcrypto, or one of another OpenSSL version's names
    return lib
