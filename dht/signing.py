"""Who owns a record: RSA keys, owner subkeys and the signature validator.

A peer's record is stored under the subkey ``[owner:<its RSA public key>]``. hivemind's
``RSASignatureValidator`` (on every node) then signs the value on store and refuses any
write to that subkey that is not signed by the matching private key, so nobody can
forge or overwrite another peer's record.

:class:`KeyringValidator` is that validator with several private keys: one DHT node
can then announce several peers (the fake swarms of tests and benchmarks, or a process
that hosts more than one stage). It validates exactly like the stock one.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)


def owner_subkey(key: RSAPrivateKey) -> bytes:
    """The subkey under which the holder of ``key`` stores its record."""
    public = key.get_public_key().to_bytes()
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public)


def key_id(subkey: bytes) -> str:
    """A short stable id of an owner subkey (12 hex digits of its SHA-256), shown as the peer id."""
    return hashlib.sha256(subkey).hexdigest()[:12]


def load_or_create_key(path: Path | str | None) -> RSAPrivateKey:
    """The RSA key in ``path`` (created there, mode 0600, if missing); a fresh key when ``path`` is None.

    A stable key keeps a restarted peer's subkey (and peer id) the same. An existing file that others may read is
    made private (0600) first, with a warning.
    """
    if path is None:
        return RSAPrivateKey()
    path = Path(path)
    if path.exists():
        keep_private(path)
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": path.read_bytes()})
        return key
    key = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(key.to_bytes())
    return key


def keep_private(path: Path) -> None:
    """Take the group's and others' permissions off a key file (a private key readable by others is not one)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(mode & 0o700)
        except OSError as e:  # a read-only mount (a container's secret): say so, and use it as it is
            logger.warning("%s is readable by others (mode %o) and cannot be made private: %s", path, mode,
                           e.strerror or e)
            return
        logger.warning("%s was readable by others (mode %o): made it private (%o)", path, mode, mode & 0o700)


class KeyringValidator(RSASignatureValidator):
    """``RSASignatureValidator`` that signs for every key of a keyring (validation is unchanged)."""

    def __init__(self, keys: Iterable[RSAPrivateKey]):
        keys = list(keys)
        if not keys:
            raise ValueError("a keyring needs at least one key")
        super().__init__(keys[0])
        self._keyring = {owner_subkey(k): k for k in keys}

    def sign_value(self, record: DHTRecord) -> bytes:
        for owner, key in self._keyring.items():
            if owner in record.key or owner in record.subkey:
                signature = key.sign(self._serialize_record(record))
                return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)
        return record.value

