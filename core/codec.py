"""AES-GCM PayloadCodec: workflow inputs, results and update payloads are encrypted before they
reach Temporal, so histories in the UI (and the server's database) show no customer data in clear.

Each payload records the id of the key that encrypted it, so keys can rotate: the first key in
the ring encrypts, every key in the ring can still decrypt older histories.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
_NONCE = 12


class EncryptionCodec(PayloadCodec):
    def __init__(self, key_ring: Sequence[tuple[str, bytes]]) -> None:
        if not key_ring:
            raise ValueError("at least one payload key is required")
        self._active_id, active = key_ring[0]
        self._encryptor = AESGCM(active)
        self._ciphers = {key_id: AESGCM(key) for key_id, key in key_ring}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            nonce = os.urandom(_NONCE)
            # the key id is bound as associated data: a payload cannot be replayed under another key id
            sealed = self._encryptor.encrypt(nonce, p.SerializeToString(), self._active_id.encode())
            out.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID: self._active_id.encode()},
                    data=nonce + sealed,
                )
            )
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding", b"") != ENCODING:
                out.append(p)  # written before encryption was on, or by another client
                continue
            key_id = p.metadata.get(KEY_ID, b"").decode()
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise ValueError(f"payload encrypted with unknown key id {key_id!r}")
            plain = cipher.decrypt(p.data[:_NONCE], p.data[_NONCE:], key_id.encode())
            out.append(Payload.FromString(plain))
        return out
