"""Verify a certificate chain after the handshake, with the libcrypto the ssl module itself uses.

Python's ssl module verifies only during a handshake, against trust anchors known beforehand.
DANE-TA (RFC 7672) learns its trust anchor from the server's own chain, and MTA-STS testing
mode must check a chain without refusing it, so both need OpenSSL's X509_verify_cert after the
fact. This module calls it through ctypes (as pyqmail reaches libcrypt): no cryptography here.
If libcrypto cannot be found, `available()` is False and the callers say so in their reports.
"""

from __future__ import annotations

import ctypes

from pyqmail import libcrypto

X509_V_FLAG_PARTIAL_CHAIN = 0x80000
X509_PURPOSE_SSL_SERVER = 2

_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    vp = ctypes.c_void_p
    sigs: dict[str, tuple[object, list[object]]] = {
        "d2i_X509": (vp, [vp, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
        "X509_free": (None, [vp]),
        "X509_STORE_new": (vp, []),
        "X509_STORE_free": (None, [vp]),
        "X509_STORE_add_cert": (ctypes.c_int, [vp, vp]),
        "X509_STORE_set_default_paths": (ctypes.c_int, [vp]),
        "X509_STORE_CTX_new": (vp, []),
        "X509_STORE_CTX_free": (None, [vp]),
        "X509_STORE_CTX_init": (ctypes.c_int, [vp, vp, vp, vp]),
        "X509_STORE_CTX_get0_param": (vp, [vp]),
        "X509_STORE_CTX_get_error": (ctypes.c_int, [vp]),
        "X509_VERIFY_PARAM_set_flags": (ctypes.c_int, [vp, ctypes.c_ulong]),
        "X509_VERIFY_PARAM_set_purpose": (ctypes.c_int, [vp, ctypes.c_int]),
        "X509_VERIFY_PARAM_set1_host": (ctypes.c_int, [vp, ctypes.c_char_p, ctypes.c_size_t]),
        "X509_VERIFY_PARAM_add1_host": (ctypes.c_int, [vp, ctypes.c_char_p, ctypes.c_size_t]),
        "X509_verify_cert": (ctypes.c_int, [vp]),
        "X509_verify_cert_error_string": (ctypes.c_char_p, [ctypes.c_long]),
        "OPENSSL_sk_new_null": (vp, []),
        "OPENSSL_sk_push": (ctypes.c_int, [vp, vp]),
        "OPENSSL_sk_free": (None, [vp]),
    }
    lib = libcrypto.load(sigs)
    _lib = lib
    return lib


def available() -> bool:
    """Return whether chains can be verified after the handshake."""
    return _load() is not None


def _x509(lib: ctypes.CDLL, der: bytes) -> int:
    buf = ctypes.c_char_p(der)
    p = ctypes.cast(buf, ctypes.c_char_p)
    x = lib.d2i_X509(None, ctypes.byref(p), len(der))
    if not x:
        raise ValueError("unparsable certificate")
    return int(x)


def verify(chain: list[bytes], anchors: list[bytes], hosts: list[str], default_paths: bool = False) -> str | None:
    """Verify chain (leaf first, DER) up to one of anchors (DER certificates, trusted even when not
    self-signed) or the system's CAs, with a name in hosts; return None if it verifies, else the reason.
    """
    lib = _load()
    if lib is None:
        return "libcrypto not available"
    if not chain:
        return "no certificate"
    certs: list[int] = []
    store = ctx = stack = None
    try:
        try:
            leaf = _x509(lib, chain[0])
            certs.append(leaf)
            rest = [_x509(lib, d) for d in chain[1:]]
            certs.extend(rest)
            trusted = [_x509(lib, d) for d in anchors]
            certs.extend(trusted)
        except ValueError as e:
            return str(e)
        store = lib.X509_STORE_new()
        stack = lib.OPENSSL_sk_new_null()
        ctx = lib.X509_STORE_CTX_new()
        if not store or not stack or not ctx:
            return "out of memory"
        for t in trusted:
            lib.X509_STORE_add_cert(store, t)
        if default_paths:
            lib.X509_STORE_set_default_paths(store)
        for c in rest:
            lib.OPENSSL_sk_push(stack, c)
        if lib.X509_STORE_CTX_init(ctx, store, leaf, stack) != 1:
            return "out of memory"
        param = lib.X509_STORE_CTX_get0_param(ctx)
        lib.X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_SSL_SERVER)
        if anchors:
            lib.X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_PARTIAL_CHAIN)
        for i, h in enumerate(hosts):
            name = h.rstrip(".").encode("idna" if not h.isascii() else "ascii")
            (lib.X509_VERIFY_PARAM_set1_host if i == 0 else lib.X509_VERIFY_PARAM_add1_host)(param, name, len(name))
        if lib.X509_verify_cert(ctx) == 1:
            return None
        err = lib.X509_STORE_CTX_get_error(ctx)
        text = lib.X509_verify_cert_error_string(err)
        return text.decode("latin-1") if text else f"error {err}"
    finally:
        if ctx:
            lib.X509_STORE_CTX_free(ctx)
        if stack:
            lib.OPENSSL_sk_free(stack)  # the certificates are freed below, not by the stack
        if store:
            lib.X509_STORE_free(store)  # drops the store's references; ours are freed below
        for c in certs:
            lib.X509_free(c)
