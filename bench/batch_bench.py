"""Batching benchmark: many clients on one model, one request at a time (MAX_BATCH_SIZE=1) against batches
(MAX_BATCH_SIZE=8), same run, same requests; and bare batched `thinker.generate` as the physical reference.

    .venv/bin/python bench/batch_bench.py [--models real,tiny] [--clients 1,2,4,8] [--requests 3] \
        [--threads 2] [--real-layers 2] [--out bench/out/batch_bench.json]

For each model two servers (`multimodal_api.py`, DEVICE_MAP=cpu, CPU_THREADS=--threads) are started, one per mode;
each load runs on one, then on the other (so other work on the machine weighs on both alike).
N concurrent clients (--clients) each send --requests streamed `/v1/chat/completions` one after the other, of
mixed kinds in turn: text, a 448x448 image, 2 s of audio; answer lengths cycle through 24, 48, 32 and 64
tokens (max_tokens; temperature 0). Measured per load: answer tokens per second (usage's completion tokens
over the wall time of the whole load), time to first token (the first content delta) p50 and p99, the total
time, and /health's p99 polled every 50 ms from another thread while the load runs.
The reference: the same kinds of prompts as one left-padded batch through bare `thinker.generate` (8 rows,
48 new tokens each, the stop tokens off), its tokens per second.

Models: `real` is configs/'s 3B config with --real-layers thinker text layers (hidden size 2048, the 151,936 x
2,048 embedding and lm_head kept; encoders of 2 layers), random weights in bfloat16 (built once into
--checkpoint, as bench/speech_bench.py builds it), so that a decoding step's cost is dominated by reading
weights, as on a GPU; `tiny` is the tests' tiny model in float32.
Goals (real widths): throughput at 4 clients >= 2.5x one-at-a-time and at 8 clients >= 4x; batched at 8
clients >= 0.8x bare batched generate; time to first token p99 no worse than one-at-a-time; /health p99 <= 25 ms.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import tiny_model  # noqa: E402
from servers import start_server  # noqa: E402
from speech_bench import real_size_checkpoint  # noqa: E402

ANSWER_LENGTHS = (24, 48, 32, 64)
KINDS = ("text", "image", "audio")
BATCHED = 8
REFERENCE_TOKENS = 48


def picture() -> Image.Image:
    """A 448x448 picture with some structure (16 x 16 tokens at the default budget)."""
    x = np.arange(448)
    channels = [np.add.outer(x, x) % 256, np.outer(x, x) % 256, np.tile(x % 256, (448, 1))]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def tone(seconds: float = 2.0, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def data_url(kind: str) -> dict[str, Any]:
    """The media part of a message of `kind`, as a data URL."""
    buffer = io.BytesIO()
    if kind == "image":
        picture().save(buffer, "PNG")
        return {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
        }
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes((tone() * 32767).astype(np.int16).tobytes())
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "wav"},
    }


def body(index: int) -> dict[str, Any]:
    """The `index`-th request of a client: kinds and answer lengths in turn."""
    kind = KINDS[index % len(KINDS)]
    content: list[dict[str, Any]] = [{"type": "text", "text": f"Request {index}: describe what you get in detail."}]
    if kind != "text":
        content.insert(0, data_url(kind))
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": ANSWER_LENGTHS[index % len(ANSWER_LENGTHS)],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def one_request(client: httpx.Client, payload: dict[str, Any]) -> tuple[float, int]:
    """Time to the first content delta, and the answer's tokens."""
    started, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - started), tokens


def load(url: str, clients: int, requests: int) -> dict[str, float]:
    """`clients` clients sending `requests` requests each; tokens per second, first-token times and /health."""
    first_times: list[float] = []
    tokens: list[int] = []
    health: list[float] = []
    running = threading.Event()
    running.set()

    def poll_health() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while running.is_set():
                started = time.perf_counter()
                client.get("/health")
                health.append(time.perf_counter() - started)
                time.sleep(0.05)

    failures: list[BaseException] = []

    def client_run(number: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                for index in range(requests):
                    first, count = one_request(client, body(number + index))
                    first_times.append(first)
                    tokens.append(count)
        except Exception as error:  # noqa: BLE001 - the load's result says it failed
            failures.append(error)

    poller = threading.Thread(target=poll_health)
    poller.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=client_run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    running.clear()
    poller.join()
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed: {failures[0]!r}")
    return {
        "clients": clients,
        "tokens": sum(tokens),
        "seconds": seconds,
        "tokens_per_s": sum(tokens) / seconds,
        "ttft_p50_s": statistics.median(first_times),
        "ttft_p99_s": float(np.percentile(first_times, 99)),
        "health_p99_ms": float(np.percentile(health, 99)) * 1000 if health else 0.0,
    }


def server_env(model_dir: Path, dtype: str, batch: int, threads: int) -> dict[str, str]:
    return {
        "MODEL_PATH": str(model_dir),
        "DEVICE_MAP": "cpu",
        "DTYPE": dtype,
        "CPU_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "MAX_BATCH_SIZE": str(batch),
        "MAX_WAITING_REQUESTS": "64",
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "warning",
    }


def serve_and_load(model_dir: Path, dtype: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """Both servers (one at a time, batched) started once; each load runs on one, then at once on the other,
    so that whatever else the machine does weighs on both alike."""
    servers = {
        batch: start_server(ROOT, server_env(model_dir, dtype, batch, args.threads), timeout=900)
        for batch in (1, BATCHED)
    }
    try:
        for _, url in servers.values():
            load(url, 1, 3)  # the first request of each kind after the warm-up
        rows = []
        for clients in args.clients:
            for batch, (_, url) in servers.items():
                row = {"max_batch_size": batch, **load(url, clients, args.requests)}
                print(f"   MAX_BATCH_SIZE={batch} clients={clients}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
                rows.append(row)
        return rows
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)


def bare_generate(model_dir: Path, dtype: str, threads: int) -> dict[str, float]:
    """Bare `thinker.generate` on BATCHED prompts of the mix as one left-padded batch: tokens per second."""
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    torch.set_num_threads(threads)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.disable_talker()
    processor = Qwen2_5OmniProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    texts, images, audios = [], [], []
    for index in range(BATCHED):
        kind = KINDS[index % len(KINDS)]
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Request {index}: describe what you get in detail."}]
        if kind != "text":
            content.insert(0, {"type": kind})
            (images if kind == "image" else audios).append(picture() if kind == "image" else tone())
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    inputs = processor(
        text=texts, images=images, audio=audios, return_tensors="pt", padding=True, audio_kwargs={"max_length": 33_600}
    )
    inputs = {
        k: v.to(model.dtype) if v.is_floating_point() and k != "feature_attention_mask" else v
        for k, v in inputs.items()
    }
    arguments = {"max_new_tokens": REFERENCE_TOKENS, "min_new_tokens": REFERENCE_TOKENS, "do_sample": False}
    with torch.inference_mode():
        model.thinker.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        model.thinker.generate(**inputs, **arguments)
        seconds = time.perf_counter() - started
    return {
        "rows": BATCHED,
        "tokens": BATCHED * REFERENCE_TOKENS,
        "seconds": seconds,
        "tokens_per_s": BATCHED * REFERENCE_TOKENS / seconds,
    }


def table(name: str, rows: list[dict[str, float]], bare: dict[str, float]) -> list[str]:
    """The model's rows as markdown: each load, batched against one at a time."""
    alone = {r["clients"]: r for r in rows if r["max_batch_size"] == 1}
    lines = [
        f"\n{name}: bare batched generate, {bare['rows']} rows: {bare['tokens_per_s']:.1f} tokens/s\n",
        "| clients | tokens/s one at a time | tokens/s batched | ratio | batched / bare | TTFT p50 1 / batched (s) "
        "| TTFT p99 1 / batched (s) | total 1 / batched (s) | /health p99 batched (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["max_batch_size"] == 1:
            continue
        one = alone[row["clients"]]
        lines.append(
            f"| {row['clients']} | {one['tokens_per_s']:.1f} | {row['tokens_per_s']:.1f} | "
            f"x{row['tokens_per_s'] / one['tokens_per_s']:.2f} | x{row['tokens_per_s'] / bare['tokens_per_s']:.2f} | "
            f"{one['ttft_p50_s']:.2f} / {row['ttft_p50_s']:.2f} | {one['ttft_p99_s']:.2f} / {row['ttft_p99_s']:.2f} | "
            f"{one['seconds']:.1f} / {row['seconds']:.1f} | {row['health_p99_ms']:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="real,tiny")
    parser.add_argument("--clients", default="1,2,4,8", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--real-layers", type=int, default=2, help="thinker text layers of the 3B widths")
    parser.add_argument("--checkpoint", default=str(Path(tempfile.gettempdir()) / "speech_bench_3b"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "batch_bench.json"))
    args = parser.parse_args()
    results, lines = {}, []
    for name in args.models.split(","):
        if name == "real":
            layers = {"thinker": args.real_layers, "talker": 2, "dit": 2}
            model_dir, dtype = real_size_checkpoint(Path(args.checkpoint), layers), "bfloat16"
            title = f"3B widths, {args.real_layers} thinker layers, bfloat16"
        else:
            model_dir, dtype, title = (
                tiny_model.build(Path(tempfile.mkdtemp()) / "tiny"),
                "float32",
                "tiny model, float32",
            )
        print(f"{title}:", flush=True)
        rows = serve_and_load(model_dir, dtype, args)
        bare = bare_generate(model_dir, dtype, args.threads)
        results[name] = {"title": title, "rows": rows, "bare": bare}
        lines += table(title, rows, bare)
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
