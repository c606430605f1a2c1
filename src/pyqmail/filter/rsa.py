"""RSA-SHA256 private-key operations through the libcrypto the ssl module uses.

dkimpy does RSA in pure Python: a 2048-bit signature costs 11-15 ms there,
most of qmail-dkim's time per message. OpenSSL does it in about 1 ms. This
module loads a PEM private key into OpenSSL (through ctypes, as
pyqmail.remote.x509verify reaches libcrypto) and signs a SHA-256 digest
with PKCS #1 v1.5 padding (RFC 8017 8.2), which is what DKIM's rsa-sha256
signs. Keys are found by modulus (`sign_digest`, for dkimpy's RSA
function, which hands over the key it parsed) or by their PEM text
(`sign_pem`, for pyqmail.filter.dkimsign, which parses nothing). Both
return None when libcrypto or the key is unusable; the caller then lets
dkimpy do the operation itself.
"""

from __future__ import annotations

import ctypes

from pyqmail import libcrypto

_EVP_PKEY_RSA = 6
_RSA_PKCS1_PADDING = 1

_lib: ctypes.CDLL | None = None
_tried = False
_keys: dict[int, int] = {}  # modulus -> EVP_PKEY*, kept for the life of the process
_by_pem: dict[bytes, int] = {}  # PEM text -> EVP_PKEY*, likewise (pyqmail.filter.dkimsign's lookup)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    vp = ctypes.c_void_p
    sz = ctypes.c_size_t
    sigs: dict[str, tuple[object, list[object]]] = {
        "BIO_new_mem_buf": (vp, [ctypes.c_char_p, ctypes.c_int]),
        "BIO_free": (ctypes.c_int, [vp]),
        "PEM_read_bio_PrivateKey": (vp, [vp, vp, vp, vp]),
        "EVP_PKEY_free": (None, [vp]),
        "EVP_PKEY_get_base_id": (ctypes.c_int, [vp]),
        "EVP_PKEY_get_size": (ctypes.c_int, [vp]),
        "EVP_PKEY_CTX_new": (vp, [vp, vp]),
        "EVP_PKEY_CTX_free": (None, [vp]),
        "EVP_PKEY_sign_init": (ctypes.c_int, [vp]),
        "EVP_PKEY_CTX_set_rsa_padding": (ctypes.c_int, [vp, ctypes.c_int]),
        "EVP_PKEY_CTX_set_signature_md": (ctypes.c_int, [vp, vp]),
        "EVP_sha256": (vp, []),
        "EVP_PKEY_sign": (ctypes.c_int, [vp, ctypes.c_char_p, ctypes.POINTER(sz), ctypes.c_char_p, sz]),
    }
    lib = libcrypto.load(sigs)  # OpenSSL 1.1 names some of these differently: dkimpy signs instead
    _lib = lib
    return lib


def available() -> bool:
    """Return whether OpenSSL can sign here (loading libcrypto on first call)."""
    return _load() is not None


def _read_pem(pem: bytes) -> int | None:
    """Return an EVP_PKEY* of the PEM RSA private key, None if OpenSSL or the key is unusable."""
    lib = _load()
    if lib is None:
        return None
    bio = lib.BIO_new_mem_buf(pem, len(pem))
    if not bio:
        return None
    try:
        pkey = lib.PEM_read_bio_PrivateKey(bio, None, None, None)
    finally:
        lib.BIO_free(bio)
    if not pkey:
        return None
    if lib.EVP_PKEY_get_base_id(pkey) != _EVP_PKEY_RSA:
        lib.EVP_PKEY_free(pkey)
        return None
    return int(pkey)


def load_key(pem: bytes, modulus: int) -> bool:
    """Load the PEM private key whose modulus is modulus into OpenSSL; return False if unusable."""
    if modulus in _keys:
        return True
    pkey = _by_pem.get(pem) or _read_pem(pem)
    if pkey is None:
        return False
    _keys[modulus] = _by_pem[pem] = pkey
    return True


def load_pem(pem: bytes) -> bool:
    """Load the PEM RSA private key into OpenSSL (once per process); return False if unusable."""
    if pem in _by_pem:
        return True
    pkey = _read_pem(pem)
    if pkey is None:
        return False
    _by_pem[pem] = pkey
    return True


def sign_pem(pem: bytes, digest: bytes) -> bytes | None:
    """Return the RSASSA-PKCS1-v1_5 SHA-256 signature of digest by the PEM key, None if OpenSSL cannot make it."""
    if not load_pem(pem):
        return None
    return _sign(_by_pem[pem], digest)


def sign_digest(modulus: int, digest: bytes) -> bytes | None:
    """Return the RSASSA-PKCS1-v1_5 SHA-256 signature of digest by the loaded key, None if not loaded."""
    pkey = _keys.get(modulus)
    return None if pkey is None else _sign(pkey, digest)


def _sign(pkey: int, digest: bytes) -> bytes | None:
    lib = _lib
    if lib is None or len(digest) != 32:
        return None
    ctx = lib.EVP_PKEY_CTX_new(pkey, None)
    if not ctx:
        return None
    try:
        if (lib.EVP_PKEY_sign_init(ctx) <= 0
                or lib.EVP_PKEY_CTX_set_rsa_padding(ctx, _RSA_PKCS1_PADDING) <= 0
                or lib.EVP_PKEY_CTX_set_signature_md(ctx, lib.EVP_sha256()) <= 0):
            return None
        size = lib.EVP_PKEY_get_size(pkey)
        out = ctypes.create_string_buffer(size)
        outlen = ctypes.c_size_t(size)
        if lib.EVP_PKEY_sign(ctx, out, ctypes.byref(outlen), digest, len(digest)) <= 0:
            return None
        return out.raw[:outlen.value]
    finally:
        lib.EVP_PKEY_CTX_free(ctx)
