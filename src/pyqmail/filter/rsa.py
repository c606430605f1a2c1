"""RSA-SHA256 private-key operations through the libcrypto the ssl module uses.

dkimpy does RSA in pure Python: a 2048-bit signature costs 11-15 ms there,
most of qmail-dkim's time per message. OpenSSL does it in about 1 ms. This
module loads a PEM private key into OpenSSL (through ctypes, as
pyqmail.remote.x509verify reaches libcrypto) and signs a SHA-256 digest
with PKCS #1 v1.5 padding (RFC 8017 8.2), which is what DKIM's rsa-sha256
signs. `sign_digest` returns None when libcrypto or the key is unusable;
the caller then lets dkimpy do the operation itself.
"""

from __future__ import annotations

import ctypes

from pyqmail import libcrypto

_EVP_PKEY_RSA = 6
_RSA_PKCS1_PADDING = 1

_lib: ctypes.CDLL | None = None
_tried = False
_keys: dict[int, int] = {}  # modulus -> EVP_PKEY*, kept for the life of the process


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


def load_key(pem: bytes, modulus: int) -> bool:
    """Load the PEM private key whose modulus is modulus into OpenSSL; return False if unusable."""
    if modulus in _keys:
        return True
    lib = _load()
    if lib is None:
        return False
    bio = lib.BIO_new_mem_buf(pem, len(pem))
    if not bio:
        return False
    try:
        pkey = lib.PEM_read_bio_PrivateKey(bio, None, None, None)
    finally:
        lib.BIO_free(bio)
    if not pkey:
        return False
    if lib.EVP_PKEY_get_base_id(pkey) != _EVP_PKEY_RSA:
        lib.EVP_PKEY_free(pkey)
        return False
    _keys[modulus] = pkey
    return True


def sign_digest(modulus: int, digest: bytes) -> bytes | None:
    """Return the RSASSA-PKCS1-v1_5 SHA-256 signature of digest by the loaded key, None if not loaded."""
    pkey = _keys.get(modulus)
    lib = _lib
    if pkey is None or lib is None or len(digest) != 32:
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
