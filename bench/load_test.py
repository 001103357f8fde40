"""Load test: N concurrent clients x M mixed requests, alone and then beside attackers, /health polled throughout.

    .venv/bin/python bench/load_test.py                     # 64 clients x 10 requests, on the tiny model
    .venv/bin/python bench/load_test.py --url http://host:8000 --api-key KEY

Mixed requests: text, image, audio, video, split video, /v1 chat with an image, bad files, and a
tenth hostile: decompression bombs (an image and a video whose headers declare huge pictures),
lying headers (a Content-Length the body never reaches, a multipart type without a boundary),
slow-drip bodies, and parts over MAX_FILE_MB. The mix runs twice: alone, then beside attackers
(64 slow-drip uploads, and 8 concurrent 200 MB /v1 bodies sent at 12.5 MB/s each, 100 MB/s together (a gigabit link),
over and over until the mix ends; /health is polled from a process of its own). It prints,
for each run, answered / lost / 5xx, valid answers not 200 and hostile ones not 4xx, latency p50 and p99
and /health p99; the attackers' answers; the p99 ratio; the peak number of generations running at once
(it must be 1); the server's RSS at start and end, and the temporary files it left behind.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import multiprocessing
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import make_media  # noqa: E402
from servers import start_server  # noqa: E402

VALID = {
    "text": ({"text": "Tell me about the sea."}, []),
    "image": ({"text": "What is this?"}, [("images", ("a.jpg", make_media.image_bytes("JPEG", (320, 240))))]),
    "audio": ({"text": "What do you hear?"}, [("audios", ("a.mp3", make_media.audio_bytes("mp3", 1.5)))]),
    "video": ({"text": "What happens?"}, [("videos", ("v.mp4", make_media.video_bytes(2.0)))]),
    "split video": (
        {"extract_video_audio": "true", "extract_video_frame": "true"},
        [("videos", ("v.mp4", make_media.video_bytes(2.0)))],
    ),
}
BAD = {
    "bad file": ({}, [("videos", ("notes.txt", b"not a video at all\n" * 50))]),
    "wrong field": ({}, [("images", ("v.mp4", make_media.video_bytes(1.0)))]),
    "truncated": ({}, [("images", ("t.png", make_media.image_bytes("PNG")[:100]))]),
}
MAX_FILE_MB = 2  # the started server's; oversized parts are sent just over it
BODY_TIMEOUT = 20  # the started server's BODY_TIMEOUT_SECONDS: slow-drip bodies are cut after it; a large body at
# --big-mb-per-s arrives within it


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header declares a huge picture."""
    png = bytearray(make_media.image_bytes("PNG", (8, 8)))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def multipart(fields: list[tuple[str, str, bytes]], boundary: str = "loadtestboundary") -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'.encode()
        + data
        + b"\r\n"
        for name, filename, data in fields
    )
    return body + f"--{boundary}--\r\n".encode()


def raw_post(
    url: str, headers: dict[str, str], chunks, pause: float = 0.0, timeout: float = 60, path: str = "/multimodal"
) -> int:
    """POST over a raw socket, sending the body chunk by chunk; the status the server answered (0: none)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "load", **headers}.items())
        connection.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        connection.setblocking(False)
        answer = b""
        for chunk in chunks:
            try:
                connection.sendall(chunk)
            except (BlockingIOError, OSError):
                break
            time.sleep(pause)
            try:
                answer += connection.recv(4096)
                if answer:
                    break
            except BlockingIOError:
                pass
        connection.settimeout(timeout)
        while b"\r\n" not in answer:
            data = connection.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def hostile(url: str, kind: str) -> int:
    boundary = "loadtestboundary"
    form = f"multipart/form-data; boundary={boundary}"
    if kind == "image bomb":
        body = multipart([("images", "bomb.png", png_bomb())])
        return raw_post(url, {"Content-Type": form, "Content-Length": str(len(body))}, [body])
    if kind == "oversized part":
        body = multipart([("videos", "big.mp4", b"\0" * (MAX_FILE_MB * 1024 * 1024 + 1))])
        return raw_post(url, {"Content-Type": form, "Content-Length": str(len(body))}, [body])
    if kind == "lying length":  # declares more than it sends, then waits
        body = multipart([("images", "a.png", make_media.image_bytes("PNG"))])
        return raw_post(url, {"Content-Type": form, "Content-Length": str(len(body) + 10_000)}, [body])
    if kind == "no boundary":
        body = multipart([("images", "a.png", make_media.image_bytes("PNG"))])
        return raw_post(url, {"Content-Type": "multipart/form-data", "Content-Length": str(len(body))}, [body])
    # slow drip: a byte every 0.25 s, for longer than BODY_TIMEOUT_SECONDS
    body = multipart([("images", "a.png", make_media.image_bytes("PNG"))])
    drops = [body[i : i + 1] for i in range(len(body))]
    return raw_post(url, {"Content-Type": form, "Content-Length": str(len(body))}, drops, pause=0.25)


HOSTILE = ["image bomb", "oversized part", "lying length", "no boundary", "slow drip"]
CHAT_IMAGE = {
    "model": "m",
    "max_tokens": 8,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(make_media.image_bytes("PNG")).decode()
                    },
                },
            ],
        }
    ],
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else 0.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_tiny_server(tmpdir: Path):
    import tiny_model

    uploads = tmpdir / "uploads"
    uploads.mkdir()
    env = {
        "MODEL_PATH": str(tiny_model.build(tmpdir / "tiny")),
        "DEVICE_MAP": "cpu",
        "TMPDIR": str(uploads),
        "LOG_LEVEL": "warning",
        "DEFAULT_MAX_NEW_TOKENS": "16",
        "MAX_WAITING_REQUESTS": "128",  # every client may wait: a 503 would count as a 5xx here
        "MAX_FILE_MB": str(MAX_FILE_MB),
        "BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    }
    return start_server(tmpdir, env)


def big_v1_body(megabytes: int) -> bytes:
    """A /v1 body of about `megabytes` MB: a video data URL far over MAX_FILE_MB (its answer must be a 413)."""
    payload = base64.b64encode(random.Random(0).randbytes(megabytes * 3 // 4 * 1024 * 1024))
    head = b'{"messages":[{"role":"user","content":[{"type":"text","text":"What happens?"},'
    return head + b'{"type":"video_url","video_url":{"url":"data:video/mp4;base64,' + payload + b'"}}]}]}'


def paced(connection: socket.socket, data: memoryview, bytes_per_second: float) -> None:
    """Send `data` at most at `bytes_per_second` (a client's link), a megabyte at a time."""
    started = time.perf_counter()
    for offset in range(0, len(data), 1024 * 1024):
        connection.sendall(data[offset : offset + 1024 * 1024])
        time.sleep(max(0.0, started + (offset + 1024 * 1024) / bytes_per_second - time.perf_counter()))


def poll_health(url: str, running, latencies) -> None:
    """GET /health every 50 ms while `running` is set, from a process of its own (so the load test's threads
    do not delay it), appending each latency in seconds."""
    with httpx.Client(timeout=10) as client:
        while running.is_set():
            started = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)


class Attackers:
    """Hostile clients beside the normal mix until stopped: slow-drip uploads (each a byte every 0.25 s until
    BODY_TIMEOUT_SECONDS cuts it) and large /v1 bodies sent as fast as the server reads them."""

    def __init__(
        self, url: str, headers: dict[str, str], drips: int, big_bodies: int, big_mb: int, big_mb_per_s: float
    ) -> None:
        self.url, self.headers = url, headers
        self.bytes_per_second = big_mb_per_s * 1024 * 1024
        self.big_body = big_v1_body(big_mb) if big_bodies else b""
        self.stop = threading.Event()
        self.statuses: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=("slow drip",)) for _ in range(drips)]
        self.threads += [threading.Thread(target=self._loop, args=("big /v1 body",)) for _ in range(big_bodies)]

    def __enter__(self) -> Attackers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _loop(self, kind: str) -> None:
        while not self.stop.is_set():
            try:
                status = hostile(self.url, kind) if kind == "slow drip" else self._big()
            except OSError:
                status = 0
            with self.lock:
                self.statuses[(kind, status)] += 1

    def _big(self) -> int:
        """One large body, sent as fast as the server takes it; the status it answered (0: none)."""
        host, port = self.url.removeprefix("http://").split(":")
        fields = {**self.headers, "Host": "load", "Content-Type": "application/json"}
        head = "".join(f"{k}: {v}\r\n" for k, v in {**fields, "Content-Length": len(self.big_body)}.items())
        with socket.create_connection((host, int(port)), timeout=120) as connection:
            connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode())
            with contextlib.suppress(OSError):  # the server may answer (and close) before the last byte
                paced(connection, memoryview(self.big_body), self.bytes_per_second)
            answer = connection.recv(4096)
        return int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0

    def wrong(self) -> list[str]:
        return [f"{kind}: {status}" for (kind, status), n in self.statuses.items() if not 400 <= status < 500]


class Mix:
    """The normal mix (a tenth of it hostile requests of its own) from N clients, /health polled meanwhile."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.statuses: collections.Counter = collections.Counter()
        self.hostile: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.health: list[float] = []
        self.wrong: list[str] = []
        self.lost = 0
        self.lock = threading.Lock()
        self.elapsed = 0.0

    def run(self, clients: int, requests: int) -> Mix:
        processes = multiprocessing.get_context("spawn")
        with processes.Manager() as manager:
            running, health = manager.Event(), manager.list()
            running.set()
            poller = processes.Process(target=poll_health, args=(self.url, running, health))
            poller.start()
            started = time.perf_counter()
            threads = [threading.Thread(target=self._client, args=(seed, requests)) for seed in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.elapsed = time.perf_counter() - started
            running.clear()
            poller.join()
            self.health = list(health)
        return self

    def _client(self, seed: int, requests: int) -> None:
        rng = random.Random(seed)
        kinds = [*list(VALID) * 3, "chat", *list(BAD)]
        with httpx.Client(timeout=600, headers=self.headers) as client:
            for _ in range(requests):
                started = time.perf_counter()
                if rng.random() < 0.1:  # a tenth hostile
                    self._hostile(rng.choice(HOSTILE))
                    continue
                kind = rng.choice(kinds)
                try:
                    if kind == "chat":
                        response = client.post(f"{self.url}/v1/chat/completions", json=CHAT_IMAGE)
                    else:
                        data, files = VALID.get(kind) or BAD[kind]
                        response = client.post(f"{self.url}/multimodal", data=data, files=files)
                except httpx.HTTPError:
                    with self.lock:
                        self.lost += 1
                    continue
                with self.lock:
                    self.latencies.append(time.perf_counter() - started)
                    self.statuses[response.status_code] += 1
                    if (kind in VALID or kind == "chat") != (response.status_code == 200):
                        self.wrong.append(f"{kind}: {response.status_code}")

    def _hostile(self, kind: str) -> None:
        try:
            status = hostile(self.url, kind)
        except OSError:
            status = 0
        with self.lock:
            if status == 0:
                self.lost += 1
                return
            self.statuses[status] += 1
            self.hostile[f"{kind}: {status}"] += 1
            if not 400 <= status < 500:
                self.wrong.append(f"hostile {kind}: {status}")

    def row(self, name: str) -> str:
        fives = sum(n for status, n in self.statuses.items() if status >= 500)
        return (
            f"| {name} | {sum(self.statuses.values())} | {self.lost} | {fives} | {len(self.wrong)} | "
            f"{percentile(self.latencies, 50) * 1000:.0f} | {percentile(self.latencies, 99) * 1000:.0f} | "
            f"{percentile(self.health, 99) * 1000:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one on the tiny model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--drips", type=int, default=64, help="slow-drip uploads beside the mix")
    parser.add_argument("--big-bodies", type=int, default=8, help="large /v1 bodies sent at once beside the mix")
    parser.add_argument("--big-mb", type=int, default=200, help="the size of each large /v1 body, in MB")
    parser.add_argument(
        "--big-mb-per-s", type=float, default=12.5, help="how fast each large body is sent (a client's link), MB/s"
    )
    parser.add_argument("--api-key")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    with tempfile.TemporaryDirectory() as folder:
        server, url = (None, args.url) if args.url else start_tiny_server(Path(folder))
        rss_start = rss_kib(server.pid) if server else 0
        alone = Mix(url, headers).run(args.clients, args.requests)
        with Attackers(url, headers, args.drips, args.big_bodies, args.big_mb, args.big_mb_per_s) as attackers:
            attacked = Mix(url, headers).run(args.clients, args.requests)
        time.sleep(1)  # the last refused bodies are let go
        health = httpx.get(f"{url}/health", headers=headers, timeout=10).json()
        rss_end = rss_kib(server.pid) if server else 0
        left = sorted(p.name for p in (Path(folder) / "uploads").iterdir()) if server else []
        if server:
            server.terminate()
            server.wait(60)
    report(args, alone, attacked, attackers, health, rss_start, rss_end, left)


def report(args, alone: Mix, attacked: Mix, attackers: Attackers, health, rss_start, rss_end, left) -> None:
    print(
        f"{args.clients} clients x {args.requests} requests, alone ({alone.elapsed:.0f} s) and beside attackers "
        f"({attacked.elapsed:.0f} s): {args.drips} slow-drip uploads, {args.big_bodies} x {args.big_mb} MB /v1 bodies "
        f"at {args.big_mb_per_s:g} MB/s each"
    )
    print("| run | answered | lost | 5xx | valid not 200, hostile not 4xx | p50 ms | p99 ms | /health p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    print(alone.row("normal mix alone"))
    print(attacked.row("normal mix beside the attackers"))
    print(f"hostile requests of the mix: {dict(sorted((alone.hostile + attacked.hostile).items()))}")
    print(
        f"attackers: {dict(sorted((f'{k}: {s}', n) for (k, s), n in attackers.statuses.items()))}; "
        f"not 4xx: {len(attackers.wrong())} {attackers.wrong()[:5]}"
    )
    ratio = percentile(attacked.latencies, 99) / max(1e-9, percentile(alone.latencies, 99))
    print(f"normal p99 beside the attackers / alone: {ratio:.2f} (goal <= 2)")
    print(f"peak generations running at once: {health['generations']['peak_running']} (must be 1)")
    if rss_start:
        print(
            f"server RSS: start {rss_start / 1024:.0f} MiB, end {rss_end / 1024:.0f} MiB "
            f"(growth {(rss_end - rss_start) / 1024:+.0f} MiB; goal <= 200 MiB)"
        )
        print(f"temporary files left: {len(left)} {left[:5]}")


if __name__ == "__main__":
    main()
