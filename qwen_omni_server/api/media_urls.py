"""A media URL's bytes for /v1: a data URL's, or a remote URL's for the hosts MEDIA_URL_HOSTS lists and
nothing else. Either way at most MAX_FILE_MB; the bytes then decode as an upload's do (`uploads.decode_file`).

A remote fetch is bounded every way a remote host could abuse it: the host must be listed, the port allowed
(MEDIA_URL_PORTS), the address actually connected to must be global (checked on the socket,
after DNS, so a listed name that resolves, or rebinds, elsewhere is caught; an IPv6 address that
carries an IPv4 one is judged by the IPv4 one), no redirects, no proxies from the environment,
at most MAX_FILE_MB, and one deadline for the whole fetch (a host that drips its bytes slowly
cannot hold the request). MEDIA_URL_ALLOW_PRIVATE lets private, loopback and shared (100.64/10)
addresses through; link-local, cloud metadata, multicast, unspecified and reserved ones never are.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import urllib.parse

import httpcore
import httpx
import pybase64
from starlette.concurrency import run_in_threadpool

from qwen_omni_server.core.settings import Settings


class FetchRefused(Exception):
    """The URL may not be fetched, or its fetch failed; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_url(url: str, settings: Settings) -> None:
    """Refuse a URL whose scheme, host or port is not allowed, before any connection."""
    try:
        parsed = urllib.parse.urlparse(url)
    except ValueError:
        raise FetchRefused(400, "the URL could not be read") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise FetchRefused(400, "only data: URLs (or http(s) URLs of allowed hosts) are accepted")
    if parsed.hostname not in settings.media_url_hosts:
        raise FetchRefused(
            400,
            "remote URLs are refused (the server fetches only from hosts listed in MEDIA_URL_HOSTS); "
            "send the media as a data URL, or list the host in MEDIA_URL_HOSTS",
        )
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise FetchRefused(400, "the URL's port is not a number") from None
    if port not in settings.media_url_ports:
        raise FetchRefused(400, f"port {port} is not allowed (MEDIA_URL_PORTS: {settings.media_url_ports})")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_METADATA = frozenset(
    ipaddress.ip_address(address) for address in ("100.100.100.200", "fd00:ec2::254", "168.63.129.16")
)  # cloud metadata and platform endpoints outside link-local (169.254.169.254 and fe80:: are refused as such)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped, NAT64 (64:ff9b::/96, and
    64:ff9b:1::/48 read as a /96), 6to4, Teredo (server and client) or IPv4-compatible; none for others."""
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.teredo:
        return list(ip.teredo)
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip in _NAT64 or ip in _NAT64_LOCAL or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    return []


def is_global(ip: Address) -> bool:
    """`is_global`, less the deprecated site-local fec0::/10 that Python 3.11 still counts as global."""
    return ip.is_global and not (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)


def never_fetched(ip: Address) -> bool:
    """Whether an address is refused even with MEDIA_URL_ALLOW_PRIVATE: link-local (metadata services live
    there), a cloud metadata endpoint, multicast, unspecified or reserved."""
    if ip in _METADATA or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return True
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_reserved or ip in _THIS_NETWORK
    return ip.is_reserved and not ip.is_loopback


def check_address(address: str, allow_private: bool) -> None:
    """Refuse every address that is not global (judging the IPv4 address inside an IPv6 one that carries one);
    MEDIA_URL_ALLOW_PRIVATE lets private, loopback and shared ones through, never those of `never_fetched`."""
    ip = ipaddress.ip_address(address.split("%")[0])
    carried = carried_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    judged: list[Address] = [*carried] or [ip]
    shown = f"{ip} (carrying {', '.join(map(str, carried))})" if carried else str(ip)
    if any(never_fetched(one) for one in judged):
        raise FetchRefused(
            400,
            f"the host resolved to {shown}, a non-public address (link-local, cloud metadata, multicast, "
            "unspecified or reserved); refused, even with MEDIA_URL_ALLOW_PRIVATE",
        )
    local_use = isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL
    if not allow_private and (local_use or not all(map(is_global, judged))):
        raise FetchRefused(
            400,
            f"the host resolved to {shown}, a non-public address; refused (MEDIA_URL_ALLOW_PRIVATE allows it)",
        )


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects as usual, then checks the peer address of the socket before a byte is sent."""

    def __init__(self, allow_private: bool) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.allow_private = allow_private

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = await self.inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        peer = stream.get_extra_info("server_addr")
        try:
            check_address(peer[0], self.allow_private)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def connect_unix_socket(self, *args, **kwargs):
        raise FetchRefused(400, "unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow_private: bool) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=self._pool._ssl_context, network_backend=_CheckedBackend(allow_private)
        )


async def fetch(url: str, settings: Settings) -> bytes:
    """The bytes at `url`, within every bound above. Raises FetchRefused."""
    check_url(url, settings)
    limit = settings.max_file_bytes
    seconds = settings.media_url_timeout_seconds
    transport = _CheckedTransport(settings.media_url_allow_private)
    try:
        async with (
            asyncio.timeout(seconds),
            httpx.AsyncClient(transport=transport, timeout=seconds, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise FetchRefused(400, f"fetching it answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise FetchRefused(413, f"over {limit:,} bytes (MAX_FILE_MB)")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > limit:
                    raise FetchRefused(413, f"over {limit:,} bytes (MAX_FILE_MB)")
            return bytes(data)
    except TimeoutError:
        raise FetchRefused(400, f"fetching it took longer than {seconds:g} s (MEDIA_URL_TIMEOUT_SECONDS)") from None
    except httpx.HTTPError as error:
        cause = error.__context__ if isinstance(error.__context__, FetchRefused) else None
        if cause is not None:
            raise cause from None
        raise FetchRefused(400, f"could not be fetched ({type(error).__name__})") from None


def base64_bytes(payload: str | memoryview, limit: int) -> bytes:
    """A base64 payload's bytes (pybase64 lets go of Python's lock while it decodes); its size is judged from its
    length before anything is decoded."""
    data = payload.strip() if isinstance(payload, str) else payload
    tail = data[-2:] if isinstance(data, str) else bytes(data[-2:]).decode("latin-1")
    size = len(data) * 3 // 4 - tail.count("=")
    if size > limit:
        raise FetchRefused(413, f"{size:,} bytes, over the limit of {limit:,} (MAX_FILE_MB)")
    try:
        return pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FetchRefused(400, "the data URL is not valid base64") from None


def percent_bytes(payload: str, limit: int) -> bytes:
    """A data URL's percent-encoded payload's bytes."""
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limit:
        raise FetchRefused(413, f"over {limit:,} bytes (MAX_FILE_MB)")
    return data


async def read_url(url: str, settings: Settings) -> bytes:
    """A data URL's bytes (decoded in a worker thread), or a remote URL's (`fetch`). Raises FetchRefused."""
    limit = settings.max_file_bytes
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        decode = base64_bytes if header.endswith(";base64") else percent_bytes
        return await run_in_threadpool(decode, payload, limit)
    return await fetch(url, settings)
