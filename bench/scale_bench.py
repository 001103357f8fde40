"""Scaling out (ENGINE=openai): throughput with two upstreams vs one, and what the front adds per request.

    .venv/bin/python bench/scale_bench.py                 # tiny model, all servers on loopback
    .venv/bin/python bench/scale_bench.py --clients 4 --requests 4 --tokens 128 --samples 15

Every server is its own process (single-threaded: OMP_NUM_THREADS=1): two upstreams (this server on the
tiny model, ENGINE=local) and two fronts (ENGINE=openai), one over the first upstream, one over both.
1. Throughput: the same client load (CLIENTS concurrent clients x REQUESTS text requests of TOKENS new
   tokens each) through the one-upstream front, then through the two-upstream front, ROUNDS times
   alternately (so load from elsewhere falls on both alike); prints each ratio and their median.
2. Overhead: a 1 MB JPEG photo sent (with 1 new token) straight to an upstream and through the front,
   alternately; prints the medians and their difference: the front's own added latency.
Goals: ratio >= 1.6; added median latency <= 15 ms.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import media  # noqa: E402
import tiny_model  # noqa: E402
from servers import start_server  # noqa: E402


def photo_jpeg(target_bytes: int = 1_000_000) -> bytes:
    """A photo-like JPEG (smooth shapes plus sensor noise) of about `target_bytes`."""
    rng = np.random.default_rng(0)
    height, width = 1200, 1600
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 170), 128 + 90 * np.cos(y / 130), 128 + 60 * np.sin((x + y) / 250)], -1)
    for quality in range(95, 10, -5):
        noisy = np.clip(base + rng.normal(0, 9, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(noisy).save(out, "JPEG", quality=quality)
        if out.tell() <= target_bytes:
            return out.getvalue()
    return out.getvalue()


def run_load(url: str, clients: int, requests: int, tokens: int) -> tuple[float, int]:
    """Seconds for `clients` concurrent clients to get `requests` answers each; and how many failed."""
    failures = []

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for number in range(requests):
                answer = http.post(
                    f"{url}/multimodal",
                    data={"text": f"Client {index} asks question {number}.", "max_new_tokens": tokens},
                )
                if answer.status_code != 200:
                    failures.append(answer.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, len(failures)


def timed_post(http: httpx.Client, url: str, image: bytes) -> float:
    started = time.perf_counter()
    answer = http.post(
        f"{url}/multimodal", data={"text": "What is this?", "max_new_tokens": 1}, files=[("images", ("p.jpg", image))]
    )
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (one upstream, then two)")
    parser.add_argument("--samples", type=int, default=15, help="1 MB image requests per path")
    args = parser.parse_args()

    processes: list[subprocess.Popen] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model.build(Path(folder) / "tiny")
        upstream_env = {"MODEL_PATH": str(model), "DEVICE_MAP": "cpu", "LOG_LEVEL": "warning"}
        try:
            upstreams = []
            for _ in range(2):
                process, url = start_server(Path(folder), upstream_env, timeout=180, **quiet)
                processes.append(process)
                upstreams.append(url)
            fronts = []
            for chosen in (upstreams[:1], upstreams):
                env = {
                    "ENGINE": "openai",
                    "ENGINE_URLS": json.dumps([f"{u}/v1" for u in chosen]),
                    "LOG_LEVEL": "warning",
                }
                process, url = start_server(Path(folder), env, timeout=60, **quiet)
                processes.append(process)
                fronts.append(url)

            run_load(fronts[1], 2, 1, 4)  # warm both upstreams
            total = args.clients * args.requests
            print(f"throughput, {args.clients} clients x {args.requests} requests x {args.tokens} tokens, alternating:")
            ratios = []
            for round_number in range(args.rounds):
                one, one_failed = run_load(fronts[0], args.clients, args.requests, args.tokens)
                two, two_failed = run_load(fronts[1], args.clients, args.requests, args.tokens)
                ratios.append(one / two)
                print(
                    f"  round {round_number + 1}: one upstream {total / one:5.2f} requests/s ({one_failed} failed), "
                    f"two upstreams {total / two:5.2f} requests/s ({two_failed} failed): {one / two:.2f}x"
                )
            print(f"  median ratio: {statistics.median(ratios):.2f}x (goal >= 1.6x)")

            image = photo_jpeg()
            direct, through = [], []
            with httpx.Client(timeout=600) as http:
                for url in (upstreams[0], fronts[0]):
                    timed_post(http, url, image)  # warm-up
                for _ in range(args.samples):
                    direct.append(timed_post(http, upstreams[0], image))
                    through.append(timed_post(http, fronts[0], image))
            decoding = []
            for _ in range(args.samples):
                started = time.perf_counter()
                media.load_image(io.BytesIO(image), max_pixels=50_000_000)
                decoding.append(time.perf_counter() - started)
            added = (statistics.median(through) - statistics.median(direct)) * 1000
            print(f"overhead, a {len(image) / 1e6:.2f} MB JPEG (1600x1200), {args.samples} requests each way:")
            print(f"  upstream directly: median {statistics.median(direct) * 1000:7.1f} ms")
            print(f"  through the front: median {statistics.median(through) * 1000:7.1f} ms")
            print(f"  added by the front: {added:.1f} ms (goal <= 15 ms)")
            print(
                f"  of which decoding and checking the picture, as every request is: {statistics.median(decoding) * 1000:.1f} ms"
            )
            print(
                f"load average after the run ({os.cpu_count()} cores; other work skews every figure): {os.getloadavg()}"
            )
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    main()
