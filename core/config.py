"""The one Settings object. Every key is listed in .env.example."""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent

# Dev-only placeholders: fine on a laptop, refused anywhere else.
DEV_PAYLOAD_KEY = "dev:" + base64.b64encode(b"paysaga-dev-payload-key-32bytes!").decode()
DEV_SECRET = "dev-insecure-secret"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    env: Literal["dev", "test", "prod"] = "dev"
    data_dir: Path = ROOT / ".data"
    log_level: str = "INFO"
    log_json: bool = False

    # application database: SQLite file by default, PostgreSQL in production
    database_url: str = ""

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_ui_port: int = 8233
    task_queue: str = "paysaga"
    # "k1:<base64 32 bytes>,k2:<...>"; the first key encrypts, all keys decrypt (rotation)
    payload_keys: str = DEV_PAYLOAD_KEY
    # Workflow runs kept in the worker's memory between tasks (each holds its sandbox, about half a
    # MB). Beyond it the least recently used run is evicted and replayed from its history when its
    # next task comes (an OTP, a capture, a timer): a few ms of CPU for a bounded RSS, which keeps
    # 2,000 payments parked in requires_action under 400 MB.
    worker_max_cached_workflows: int = Field(default=300, ge=100)  # >= the worker's concurrent workflow tasks

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # keyed HMAC for card fingerprints: same card -> same fingerprint, not reversible
    fingerprint_key: str = DEV_SECRET
    update_wait_seconds: float = Field(default=20.0, description="how long POST waits for a stable status")

    # PSP
    psp_default: Literal["sandbox", "stripe"] = "sandbox"
    stripe_api_key: str = ""  # empty: the Stripe adapter is not registered
    stripe_api_base: str = "https://api.stripe.com"
    stripe_webhook_secret: str = ""
    stripe_return_url: str = ""  # where Stripe sends the customer back after 3-D Secure
    sandbox_host: str = "127.0.0.1"
    sandbox_port: int = 8100
    sandbox_url: str = ""
    sandbox_api_key: str = DEV_SECRET
    sandbox_webhook_secret: str = DEV_SECRET
    sandbox_webhook_url: str = ""  # where the sandbox sends its events (empty: none)
    sandbox_db: str = ""  # sandbox state file; empty: <data_dir>/sandbox.db
    # A second sandbox PSP, registered as "sandbox_b" (failover tests, `make run`): SANDBOX_B_PORT
    # makes `paysaga up` start it; SANDBOX_B_URL alone points at one running elsewhere.
    sandbox_b_port: int = 0  # 0: `paysaga up` starts no second sandbox
    sandbox_b_url: str = ""  # empty: http://<sandbox_host>:<sandbox_b_port> if that port is set, else none
    sandbox_b_db: str = ""  # empty: <data_dir>/sandbox_b.db
    sandbox_b_webhook_url: str = ""  # where the second sandbox sends its events (empty: none)
    # PSP routing: a PSP's circuit opens after this many calls in a row found it unavailable
    # (connection refused, 5xx, 429), and lets one trial call through after the cool-down.
    psp_breaker_failures: int = Field(default=5, ge=1)
    psp_breaker_cooldown_s: float = Field(default=30.0, ge=0)

    # fees and fraud defaults for new merchants (per-merchant values live in the database)
    default_fee_bps: int = 290
    default_fee_fixed: int = 30

    # notifications: smtp://host:port; empty logs the message instead of sending it
    smtp_url: str = ""
    mail_from: str = "receipts@paysaga.local"

    @model_validator(mode="after")
    def _derive_and_refuse_placeholders(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'paysaga.db'}"
        if not self.sandbox_url:
            self.sandbox_url = f"http://{self.sandbox_host}:{self.sandbox_port}"
        if not self.sandbox_webhook_url:
            # the sandbox reports asynchronous outcomes (disputes, late answers) to our own API
            self.sandbox_webhook_url = f"http://{self.api_host}:{self.api_port}/v1/psp/sandbox/webhooks"
        if not self.sandbox_db:
            self.sandbox_db = str(self.data_dir / "sandbox.db")
        if not self.sandbox_b_url and self.sandbox_b_port:
            self.sandbox_b_url = f"http://{self.sandbox_host}:{self.sandbox_b_port}"
        if not self.sandbox_b_webhook_url and self.sandbox_b_url:
            self.sandbox_b_webhook_url = f"http://{self.api_host}:{self.api_port}/v1/psp/sandbox_b/webhooks"
        if not self.sandbox_b_db:
            self.sandbox_b_db = str(self.data_dir / "sandbox_b.db")
        if self.env == "prod":
            placeholders = [
                name
                for name, value in (
                    ("PAYLOAD_KEYS", self.payload_keys),
                    ("FINGERPRINT_KEY", self.fingerprint_key),
                    ("SANDBOX_API_KEY", self.sandbox_api_key),
                    ("SANDBOX_WEBHOOK_SECRET", self.sandbox_webhook_secret),
                )
                if DEV_SECRET in value or value == DEV_PAYLOAD_KEY
            ]
            if placeholders:
                raise ValueError(f"placeholder secrets are refused outside dev: {', '.join(placeholders)}")
        return self

    def payload_key_ring(self) -> list[tuple[str, bytes]]:
        """[(key_id, 32-byte key), ...]; the first one encrypts."""
        ring = []
        for item in self.payload_keys.split(","):
            key_id, _, b64 = item.strip().partition(":")
            key = base64.b64decode(b64)
            if not key_id or len(key) not in (16, 24, 32):
                raise ValueError("PAYLOAD_KEYS entries must be id:<base64 AES key of 16/24/32 bytes>")
            ring.append((key_id, key))
        return ring


@lru_cache
def get_settings() -> Settings:
    return Settings()
