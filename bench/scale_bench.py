"""Scaling out (ENGINE=openai): throughput with two upstreams vs one, and what the front adds per request.

    .venv/bin/python bench/scale_bench.py                 # tiny model, all servers on loopback
    .venv/bin/python bench/scale_bench.py --clients 4 --requests 4 --tokens 128 --samples 15

Every server is its own process (single-threaded: OMP_NUM_THREADS=1): two upstreams (this server on the
tiny model, ENGINE=local) and two fronts (ENGINE=openai), one over the first upstream, one over both.
1. Throughput: the same client load (CLIENTS concurrent clients x REQUESTS text requests of TOKENS new
   tokens each) through the one-upstream front, then through the two-upstream front, ROUNDS times
   alternately (so load from elsewhere falls on both alike); prints each ratio and their median.
2. Overhead: a 1 MB JPEG photo asked about (1 new token) straight from an upstream and through the front,
   one right after the other, the same way both times: as a /v1 data URL (how any OpenAI-compatible upstream
   such as vLLM is called directly), then as a /multimodal form; prints the medians, and the median of the
   differences within each pair: the front's own added latency.
Goals: ratio >= 1.6; added median latency <= 15 ms.
"""

from __future__ import annotations

import argparse
import base64
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

import tiny_model  # noqa: E402
from servers import start_server  # noqa: E402

from qwen_omni_server.core import media  # noqa: E402


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


def throughput(fronts: list[str], clients: int, requests: int, tokens: int, rounds: int) -> None:
    """The same load through the front over one upstream, then over two, `rounds` times alternately."""
    run_load(fronts[1], 2, 1, 4)  # warm both upstreams
    total = clients * requests
    print(f"throughput, {clients} clients x {requests} requests x {tokens} tokens, alternating:")
    ratios = []
    for round_number in range(rounds):
        one, one_failed = run_load(fronts[0], clients, requests, tokens)
        two, two_failed = run_load(fronts[1], clients, requests, tokens)
        ratios.append(one / two)
        print(
            f"  round {round_number + 1}: one upstream {total / one:5.2f} requests/s ({one_failed} failed), "
            f"two upstreams {total / two:5.2f} requests/s ({two_failed} failed): {one / two:.2f}x"
        )
    print(f"  median ratio: {statistics.median(ratios):.2f}x (goal >= 1.6x)")


def timed_post(http: httpx.Client, url: str, route: str, image: bytes) -> float:
    """Seconds for one answer (1 new token) about `image`: as a multipart form, or as a /v1 data URL."""
    started = time.perf_counter()
    if route == "/multimodal":
        form = {"text": "What is this?", "max_new_tokens": 1}
        answer = http.post(f"{url}/multimodal", data=form, files=[("images", ("p.jpg", image))])
    else:
        picture = {
            "type": "image_url",
            "image_url": {"url": f"data:image/jpeg;base64,{base64.b64encode(image).decode()}"},
        }
        content = [picture, {"type": "text", "text": "What is this?"}]
        body = {"model": "any", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": content}]}
        answer = http.post(f"{url}/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed


def overhead(upstream: str, front: str, image: bytes, samples: int) -> None:
    """The same request the same way to the upstream and through the front, alternately, on each route."""
    print(f"overhead, a {len(image) / 1e6:.2f} MB JPEG (1600x1200), {samples} requests each way and route:")
    with httpx.Client(timeout=600) as http:
        for route in ("/v1/chat/completions", "/multimodal"):
            for url in (upstream, front):
                timed_post(http, url, route, image)  # warm-up
            direct, through = [], []
            for _ in range(samples):
                direct.append(timed_post(http, upstream, route, image))
                through.append(timed_post(http, front, route, image))
            # Each pair back to back: the difference within a pair is free of the machine's slower drifts.
            added = statistics.median(t - d for t, d in zip(through, direct, strict=True)) * 1000
            print(
                f"  {route:21} upstream directly {statistics.median(direct) * 1000:6.1f} ms, through the front "
                f"{statistics.median(through) * 1000:6.1f} ms (medians); added, median of the pairs: "
                f"{added:5.1f} ms (goal <= 15 ms)"
            )
    picture = media.picture_file(io.BytesIO(image), max_pixels=50_000_000)
    checking = timed(lambda: media.check_picture(picture, max_pixels=50_000_000), samples)
    decoding = timed(lambda: media.load_image(io.BytesIO(image), max_pixels=50_000_000), samples)
    print(
        f"  the front's check of the picture ({checking * 1000:.1f} ms; a full decode for a model: "
        f"{decoding * 1000:.1f} ms) runs while the upstream works on it"
    )


def timed(work, samples: int) -> float:
    """Median seconds of `work()`."""
    seconds = []
    for _ in range(samples):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput rounds (one upstream, then two); 0: overhead only"
    )
    parser.add_argument("--samples", type=int, default=21, help="1 MB image requests per route and way")
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

            if args.rounds:
                throughput(fronts, args.clients, args.requests, args.tokens, args.rounds)
            overhead(upstreams[0], fronts[0], photo_jpeg(), args.samples)
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
