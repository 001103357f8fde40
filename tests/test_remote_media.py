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


FETCHED, PRIVATE, NEVER = "fetched", "only with MEDIA_URL_ALLOW_PRIVATE", "never"


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("8.8.8.8", FETCHED),
        ("93.184.216.34", FETCHED),
        ("2001:4860:4860::8888", FETCHED),
        ("2606:4700::1111", FETCHED),
        ("::ffff:8.8.8.8", FETCHED),
        ("64:ff9b::808:808", FETCHED),  # NAT64 to a public address
        ("2002:808:808::1", FETCHED),  # 6to4 of a public address
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", FETCHED),  # Teredo: public server, public client 8.8.8.8
        ("127.0.0.1", PRIVATE),
        ("10.1.2.3", PRIVATE),
        ("192.168.0.1", PRIVATE),
        ("172.16.0.1", PRIVATE),
        ("::1", PRIVATE),
        ("::ffff:127.0.0.1", PRIVATE),
        ("fc00::1", PRIVATE),
        ("fec0::1", PRIVATE),  # site-local, global to Python 3.11
        ("100.64.0.1", PRIVATE),  # carrier-grade NAT, not private to Python 3.11
        ("192.0.2.1", PRIVATE),  # documentation
        ("198.18.0.1", PRIVATE),  # benchmarking
        ("64:ff9b::a00:1", PRIVATE),  # NAT64 to 10.0.0.1, global to Python 3.11
        ("64:ff9b:1::808:808", PRIVATE),  # local-use NAT64
        ("2002:a00:1::1", PRIVATE),  # 6to4 of 10.0.0.1, global to Python 3.11
        ("2001:0:4136:e378:8000:63bf:3f57:fffe", PRIVATE),  # Teredo client 192.168.0.1
        ("2001:0:a00:1:8000:63bf:f7f7:f7f7", PRIVATE),  # Teredo server 10.0.0.1
        ("::a00:1", PRIVATE),  # IPv4-compatible 10.0.0.1
        ("169.254.169.254", NEVER),
        ("::ffff:169.254.169.254", NEVER),
        ("64:ff9b::a9fe:a9fe", NEVER),  # NAT64 to 169.254.169.254
        ("2002:a9fe:a9fe::1", NEVER),
        ("fe80::1%eth0", NEVER),
        ("100.100.100.200", NEVER),  # cloud metadata inside 100.64/10
        ("fd00:ec2::254", NEVER),  # cloud metadata inside fc00::/7
        ("0.0.0.0", NEVER),
        ("0.1.2.3", NEVER),
        ("::", NEVER),
        ("224.0.0.1", NEVER),
        ("ff0e::1", NEVER),  # global-scope multicast, global to Python 3.11
        ("240.0.0.1", NEVER),
        ("255.255.255.255", NEVER),
    ],
)
def test_which_addresses_are_fetched(address, verdict):
    """Only global addresses, judged by the IPv4 address an IPv6 one carries; MEDIA_URL_ALLOW_PRIVATE lets the
    private ones through, never link-local, metadata, multicast, unspecified or reserved ones."""
    for allow_private in (False, True):
        if verdict == FETCHED or (verdict == PRIVATE and allow_private):
            remote_media.check_address(address, allow_private=allow_private)
            continue
        with pytest.raises(remote_media.FetchRefused, match="MEDIA_URL_ALLOW_PRIVATE") as refused:
            remote_media.check_address(address, allow_private=allow_private)
        assert refused.value.status == 400 and "non-public address" in str(refused.value)


def test_a_refusal_names_the_ipv4_address_an_ipv6_one_carries():
    with pytest.raises(remote_media.FetchRefused, match=r"64:ff9b::a00:1 \(carrying 10\.0\.0\.1\)"):
        remote_media.check_address("64:ff9b::a00:1", allow_private=False)
    with pytest.raises(remote_media.FetchRefused, match="even with MEDIA_URL_ALLOW_PRIVATE"):
        remote_media.check_address("100.100.100.200", allow_private=True)


def test_v1_refuses_a_listed_name_that_resolves_to_loopback(port, make_client, fake_engine):
    client = make_client(fake_engine, media_url_hosts=["localhost"], media_url_ports=[port])
    part = {"type": "image_url", "image_url": {"url": f"http://localhost:{port}/a"}}
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]})
    assert response.status_code == 400 and "non-public address" in response.json()["error"]["message"]
