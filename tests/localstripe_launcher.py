"""Run localstripe (a third-party fake Stripe server) on 127.0.0.1 for the Stripe adapter's tests.

localstripe's own CLI binds every interface (`::`) and reads/writes /tmp/localstripe.pickle, shared by
every run on the machine. This launcher starts its aiohttp app on a socket bound to 127.0.0.1 only
(port 0 = the OS picks a free one, printed on the first stdout line, so there is no race for a port)
and keeps the store in memory: the `--from-scratch` behaviour, without touching the shared file.

One fidelity patch, so tests use Stripe's documented test cards: real Stripe declines 4000000000000002
when it is charged (decline_code generic_decline); localstripe declines it only when it is attached to
a customer. It still charges every other card the way localstripe does.

Used as `python -m tests.localstripe_launcher [--port N]`, or from tests through `running_localstripe()`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# localstripe accepts any key of the form sk_...; this one is only ever sent to 127.0.0.1.
TEST_API_KEY = "sk_test_paysaga_localstripe"
DECLINED_ON_CHARGE = frozenset({"4000000000000002"})


def serve(host: str, port: int) -> None:
    from aiohttp import web
    from localstripe import resources, server

    # In memory only: never load or write the pickle in /tmp that every localstripe run shares.
    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]
    resources.store.clear()

    charging_is_declined = resources.PaymentMethod._charging_is_declined

    def _charging_is_declined(self: object) -> bool:
        if (
            getattr(self, "type", None) == "card"
            and getattr(self, "_card_number", None) in DECLINED_ON_CHARGE
        ):
            return True
        return bool(charging_is_declined(self))

    resources.PaymentMethod._charging_is_declined = _charging_is_declined  # type: ignore[method-assign]

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sys.stdout.write(f"{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    web.run_app(server.app, sock=sock, access_log=None, print=None, handle_signals=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


@contextlib.contextmanager
def running_localstripe(timeout: float = 20.0) -> Iterator[str]:
    """Start localstripe in a subprocess on a free 127.0.0.1 port; yields its base URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # stderr goes to a file, not a pipe nobody reads (a full pipe would block the server)
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.localstripe_launcher"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            proc.kill()
            proc.wait(timeout=5)
            errors.seek(0)
            raise RuntimeError(f"localstripe did not start: {line!r} {errors.read()[-2000:]}")
        base = f"http://127.0.0.1:{line}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                # /js.stripe.com/v3/ is served without a key: a cheap readiness probe
                if httpx.get(f"{base}/js.stripe.com/v3/", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("localstripe did not become ready")
            time.sleep(0.05)
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        errors.close()


if __name__ == "__main__":
    main()
