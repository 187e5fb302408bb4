"""The Temporal client as every process builds it: pydantic data converter + encryption codec."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from core.codec import EncryptionCodec
from core.config import Settings


def data_converter(settings: Settings) -> DataConverter:
    return dataclasses.replace(
        pydantic_data_converter, payload_codec=EncryptionCodec(settings.payload_key_ring())
    )


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )
