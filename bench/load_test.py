"""Load test: N concurrent clients x M mixed requests against the server, with /health polled throughout.

    .venv/bin/python bench/load_test.py                     # starts the server on the tiny model
    .venv/bin/python bench/load_test.py --url http://host:8000 --api-key KEY

Mixed requests: text, image, audio, video, split video, and bad files. It prints answered /
errors by status / lost, latency p50 and p99, the peak number of generations running at once
(from the server's /health; it must be 1), /health latency p99 during the run, the server's RSS
at start and end, and the temporary files it left behind.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import tempfile
import threading
import time
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
    }
    return start_server(tmpdir, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one on the tiny model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
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

        def client_loop(seed: int) -> None:
            nonlocal lost
            rng = random.Random(seed)
            kinds = list(VALID) * 3 + list(BAD)
            with httpx.Client(timeout=600, headers=headers) as client:
                for _ in range(args.requests):
                    kind = rng.choice(kinds)
                    data, files = VALID.get(kind) or BAD[kind]
                    started = time.perf_counter()
                    try:
                        response = client.post(f"{url}/multimodal", data=data, files=files)
                    except httpx.HTTPError:
                        lost += 1
                        continue
                    latencies.append(time.perf_counter() - started)
                    statuses[response.status_code] += 1
                    if (kind in VALID) != (response.status_code == 200):
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
