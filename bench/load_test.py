"""Load test: N concurrent clients x M mixed requests against the server, with /health polled throughout.

    .venv/bin/python bench/load_test.py                     # 64 clients x 10 requests, on the tiny model
    .venv/bin/python bench/load_test.py --url http://host:8000 --api-key KEY

Mixed requests: text, image, audio, video, split video, /v1 chat with an image, bad files, and a
tenth hostile: decompression bombs (an image and a video whose headers declare huge pictures),
lying headers (a Content-Length the body never reaches, a multipart type without a boundary),
slow-drip bodies, and parts over MAX_FILE_MB. It prints answered / errors by status / lost, how
many valid answers were not 200 and hostile ones not 4xx, latency p50 and p99, the peak number
of generations running at once (from /health; it must be 1), /health latency p99 during the run,
the server's RSS at start and end, and the temporary files it left behind.
"""

from __future__ import annotations

import argparse
import base64
import collections
import random
import socket
import statistics
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
BODY_TIMEOUT = 10  # the started server's BODY_TIMEOUT_SECONDS: slow-drip bodies are cut after it


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


def raw_post(url: str, headers: dict[str, str], chunks, pause: float = 0.0, timeout: float = 60) -> int:
    """POST over a raw socket, sending the body chunk by chunk; the status the server answered (0: none)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "load", **headers}.items())
        connection.sendall(f"POST /multimodal HTTP/1.1\r\n{head}\r\n".encode())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one on the tiny model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    with tempfile.TemporaryDirectory() as folder:
        server, url = (None, args.url) if args.url else start_tiny_server(Path(folder))
        rss_start = rss_kib(server.pid) if server else 0
        statuses: collections.Counter = collections.Counter()
        latencies: list[float] = []
        wrong: list[str] = []
        lost = 0
        health_latencies: list[float] = []
        running = threading.Event()
        running.set()

        def poll_health() -> None:
            with httpx.Client(timeout=10) as client:
                while running.is_set():
                    started = time.perf_counter()
                    client.get(f"{url}/health")
                    health_latencies.append(time.perf_counter() - started)
                    time.sleep(0.05)

        hostile_statuses: collections.Counter = collections.Counter()
        lock = threading.Lock()

        def client_loop(seed: int) -> None:
            nonlocal lost
            rng = random.Random(seed)
            kinds = [*list(VALID) * 3, "chat", *list(BAD)]
            with httpx.Client(timeout=600, headers=headers) as client:
                for _ in range(args.requests):
                    started = time.perf_counter()
                    if rng.random() < 0.1:  # a tenth hostile
                        kind = rng.choice(HOSTILE)
                        try:
                            status = hostile(url, kind)
                        except OSError:
                            status = 0
                        with lock:
                            if status == 0:
                                lost += 1
                                continue
                            statuses[status] += 1
                            hostile_statuses[f"{kind}: {status}"] += 1
                            if not 400 <= status < 500:
                                wrong.append(f"hostile {kind}: {status}")
                        continue
                    kind = rng.choice(kinds)
                    try:
                        if kind == "chat":
                            response = client.post(f"{url}/v1/chat/completions", json=CHAT_IMAGE)
                        else:
                            data, files = VALID.get(kind) or BAD[kind]
                            response = client.post(f"{url}/multimodal", data=data, files=files)
                    except httpx.HTTPError:
                        with lock:
                            lost += 1
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        statuses[response.status_code] += 1
                        if (kind in VALID or kind == "chat") != (response.status_code == 200):
                            wrong.append(f"{kind}: {response.status_code}")

        poller = threading.Thread(target=poll_health)
        poller.start()
        started = time.perf_counter()
        clients = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(args.clients)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.perf_counter() - started
        running.clear()
        poller.join()
        health = httpx.get(f"{url}/health", timeout=10).json()
        rss_end = rss_kib(server.pid) if server else 0
        left = sorted(p.name for p in (Path(folder) / "uploads").iterdir()) if server else []
        if server:
            server.terminate()
            server.wait(60)

    total = args.clients * args.requests
    answered = sum(statuses.values())
    print(f"{args.clients} clients x {args.requests} requests = {total} in {elapsed:.1f} s")
    print(
        f"answered {answered}, lost {lost}; by status: {dict(sorted(statuses.items()))}; "
        f"valid ones not 200 / bad ones not 4xx: {len(wrong)} {wrong[:5]}"
    )
    print(f"hostile: {dict(sorted(hostile_statuses.items()))}")
    print(f"5xx: {sum(n for status, n in statuses.items() if status >= 500)}")
    print(f"latency p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms")
    print(f"peak generations running at once: {health['generations']['peak_running']} (must be 1)")
    print(
        f"/health during the run: {len(health_latencies)} polls, p99 {percentile(health_latencies, 99) * 1000:.1f} ms "
        f"(target <= 25 ms), median {statistics.median(health_latencies) * 1000:.1f} ms"
    )
    if server:
        print(
            f"server RSS: start {rss_start / 1024:.0f} MiB, end {rss_end / 1024:.0f} MiB "
            f"(growth {(rss_end - rss_start) / 1024:+.0f} MiB; bound: 200 MiB)"
        )
        print(f"temporary files left: {len(left)} {left[:5]}")


if __name__ == "__main__":
    main()
