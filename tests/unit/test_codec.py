import base64
import os

import pytest
from temporalio.api.common.v1 import Payload

from core.codec import ENCODING, KEY_ID, EncryptionCodec
from core.config import Settings


def _payload(data: bytes) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


async def test_round_trip_hides_the_clear_text() -> None:
    codec = EncryptionCodec([("k1", os.urandom(32))])
    secret = b'{"email":"ada@example.com"}'
    [enc] = await codec.encode([_payload(secret)])
    assert enc.metadata["encoding"] == ENCODING
    assert enc.metadata[KEY_ID] == b"k1"
    assert b"ada@example.com" not in enc.data
    [dec] = await codec.decode([enc])
    assert dec.data == secret and dec.metadata["encoding"] == b"json/plain"


async def test_rotation_old_key_still_decrypts() -> None:
    old, new = os.urandom(32), os.urandom(32)
    [enc] = await EncryptionCodec([("old", old)]).encode([_payload(b"x")])
    [dec] = await EncryptionCodec([("new", new), ("old", old)]).decode([enc])
    assert dec.data == b"x"


async def test_unknown_key_and_tampering_are_refused() -> None:
    [enc] = await EncryptionCodec([("k1", os.urandom(32))]).encode([_payload(b"x")])
    with pytest.raises(ValueError):
        await EncryptionCodec([("k2", os.urandom(32))]).decode([enc])
    wrong_key = EncryptionCodec([("k1", os.urandom(32))])
    with pytest.raises(Exception):  # noqa: B017 - cryptography raises InvalidTag
        await wrong_key.decode([enc])


async def test_unencrypted_payloads_pass_through() -> None:
    p = _payload(b"plain")
    assert (await EncryptionCodec([("k1", os.urandom(32))]).decode([p]))[0] == p


def test_settings_key_ring_and_placeholders_refused_in_prod() -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    ring = Settings(payload_keys=f"a:{key},b:{key}").payload_key_ring()
    assert [k for k, _ in ring] == ["a", "b"]
    with pytest.raises(ValueError, match="placeholder"):
        Settings(env="prod")
