"""The Temporal client as every process builds it: pydantic data converter + encryption codec."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import TypeAdapter
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)

from core.codec import EncryptionCodec
from core.config import Settings

# One TypeAdapter per type for the whole process. The SDK's pydantic converter caches adapters
# per converter instance, and the worker builds a converter for every workflow run, so each run
# rebuilt the pydantic schema of its input and of every activity result (py-spy: ~5% of the
# worker's busy samples).
_adapter = functools.lru_cache(maxsize=1024)(TypeAdapter)


class _SharedAdapterJSONConverter(PydanticJSONPlainPayloadConverter):
    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        hint: Any = Any if type_hint is None else type_hint
        try:
            adapter = _adapter(hint)
        except TypeError:  # an unhashable hint: no cache for it
            adapter = TypeAdapter(hint)
        return adapter.validate_json(payload.data)


class PayloadConverter(CompositePayloadConverter):
    """temporalio.contrib.pydantic's converter, with the process-wide adapter cache."""

    def __init__(self) -> None:
        json_converter = _SharedAdapterJSONConverter()
        super().__init__(
            *(
                json_converter if isinstance(c, JSONPlainPayloadConverter) else c
                for c in DefaultPayloadConverter.default_encoding_payload_converters
            )
        )


def data_converter(settings: Settings) -> DataConverter:
    return DataConverter(
        payload_converter_class=PayloadConverter,
        payload_codec=EncryptionCodec(settings.payload_key_ring()),
    )


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )
