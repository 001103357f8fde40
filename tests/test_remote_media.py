"""Remote media (MEDIA_URL_HOSTS): the address actually connected to, the port, and one deadline for the
whole fetch. Every server here is on loopback."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest

from qwen_omni_server.api import media_urls as remote_media
from qwen_omni_server.core.settings import Settings


class Drip(http.server.BaseHTTPRequestHandler):
    """/slow promises 1000 bytes and sends one every 0.2 s; anything else is a small answer at once."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000 if self.path == "/slow" else 1):
            try:
                self.wfile.write(b"x" * (1 if self.path == "/slow" else 1000))
                self.wfile.flush()
            except OSError:
                return
            if self.path == "/slow":
                time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def settings(port: int, **overrides) -> Settings:
    options = {"media_url_hosts": ["localhost", "127.0.0.1"], "media_url_ports": [port], **overrides}
    return Settings(_env_file=None, model_path="unused", **options)


def fetch(url: str, settings: Settings) -> bytes:
    return asyncio.run(asyncio.wait_for(remote_media.fetch(url, settings), 20))


def test_a_listed_name_that_resolves_to_loopback_is_refused(port):
    with pytest.raises(remote_media.FetchRefused, match="non-public address") as refused:
        fetch(f"http://localhost:{port}/a", settings(port))
    assert "MEDIA_URL_ALLOW_PRIVATE" in str(refused.value) and refused.value.status == 400
    assert len(fetch(f"http://localhost:{port}/a", settings(port, media_url_allow_private=True))) == 1000


def test_only_allowed_ports(port):
    with pytest.raises(remote_media.FetchRefused, match="MEDIA_URL_PORTS"):
        fetch(f"http://127.0.0.1:{port}/a", settings(port, media_url_ports=[80, 443], media_url_allow_private=True))


def test_a_slow_drip_host_is_cut_by_one_deadline(port):
    started = time.monotonic()
    options = {"media_url_allow_private": True, "media_url_timeout_seconds": 1}
    with pytest.raises(remote_media.FetchRefused, match="MEDIA_URL_TIMEOUT_SECONDS"):
        fetch(f"http://127.0.0.1:{port}/slow", settings(port, **options))
    assert time.monotonic() - started < 5  # each byte came well within a per-read timeout; the whole did not


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
    ],
)
def test_which_addresses_are_public(address, public):
    if public:
        remote_media.check_address(address, allow_private=False)
    else:
        with pytest.raises(remote_media.FetchRefused):
            remote_media.check_address(address, allow_private=False)
        remote_media.check_address(address, allow_private=True)


def test_v1_refuses_a_listed_name_that_resolves_to_loopback(port, make_client, fake_engine):
    client = make_client(fake_engine, media_url_hosts=["localhost"], media_url_ports=[port])
    part = {"type": "image_url", "image_url": {"url": f"http://localhost:{port}/a"}}
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]})
    assert response.status_code == 400 and "non-public address" in response.json()["error"]["message"]
