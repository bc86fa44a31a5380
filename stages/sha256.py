"""sha256 without hashlib: importing hashlib loads OpenSSL's libcrypto (~2.5 ms of every cow-*
command's start, for one digest of a few KiB).  CPython's own implementation is built in."""

try:
    from _sha2 import sha256  # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256  # CPython <= 3.11
    except ImportError:  # another Python: the public one
        from hashlib import sha256

__all__ = ["sha256"]
