"""Local servers for tests and benchmarks: a free loopback port, and the API started as its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float = 30) -> None:
    """Return once `condition()` holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.05)


def start_server(
    cwd: Path, env: dict[str, str], timeout: float = 60, port: int | None = None, **popen
) -> tuple[subprocess.Popen, str]:
    """`python multimodal_api.py` on a loopback port (a free one unless given) with `env` on top of ours; returns
    the process and its base URL once /health answers 200 (raises if it exits or does not get ready in time)."""
    port = port or free_port()
    environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "OMP_NUM_THREADS": "1", **env}
    server = subprocess.Popen([sys.executable, str(ROOT / "multimodal_api.py")], env=environment, cwd=cwd, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"the server was not ready within {timeout:g} s")


def run_until_exit(cwd: Path, port: int, **env: str) -> subprocess.CompletedProcess:
    """`python multimodal_api.py` with `env` on top of ours (less any model, placement or port settings of
    ours), offline, run to its exit; for start-up failures, which must exit with one clear line."""
    ours = ("MODEL_", "DEVICE_", "PORT", "QUANTIZATION")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    environment.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PORT": str(port), **env})
    return subprocess.run(
        [sys.executable, str(ROOT / "multimodal_api.py")],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
