"""The planner's command line: `python modeling_low_vram.py plan --model 3b --gpu-gib 8 [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.local import quantization
from qwen_omni_server.local.devices import planning_budgets
from qwen_omni_server.local.loading import MODEL_SHORTHANDS, ModelLoadError, load_config
from qwen_omni_server.local.placement import (
    ConfigError,
    GiB,
    honest_placement,
    parse_device_map,
    plan_placement,
    runs_on_gpu,
)

USAGE = (
    "usage: python modeling_low_vram.py plan --model 3b|7b|PATH_OR_CONFIG_JSON --gpu-gib N "
    "[--dtype D] [--device-map M] [--audio-output] [--quantization none|int8|nf4] [--context N] [--json]"
)


def _plan_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python modeling_low_vram.py plan",
        description="Plan where Qwen2.5-Omni runs for a GPU memory budget (no GPU needed).",
    )
    parser.add_argument(
        "--model", required=True, help="3b or 7b (the configs in configs/), a checkpoint folder, hub id, or config.json"
    )
    parser.add_argument("--gpu-gib", type=float, required=True, help="GPU memory budget in GiB")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--device-map", default="auto", help="auto (plan), or a preset / JSON map to cost (see DEVICE_MAP)"
    )
    parser.add_argument("--audio-output", action="store_true", help="also place the talker and token2wav")
    parser.add_argument(
        "--quantization",
        default="none",
        choices=quantization.SCHEMES,
        help="the language model's weights (QUANTIZATION)",
    )
    settings = Settings()  # the budgets of this server (.env and environment), for the encoders' headroom
    parser.add_argument(
        "--context",
        type=int,
        default=settings.max_context_tokens,
        help="planning context in tokens (default MAX_CONTEXT_TOKENS)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        config = load_config(str(MODEL_SHORTHANDS.get(args.model.lower(), args.model)))
        chosen = parse_device_map(args.device_map)
    except (ModelLoadError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if chosen is not None:
        chosen, _ = honest_placement(chosen, any(runs_on_gpu(d) for d in chosen.values()))
    plan = plan_placement(
        config,
        int(args.gpu_gib * GiB),
        getattr(torch, args.dtype),
        audio_output=args.audio_output,
        placement=chosen,
        **{**planning_budgets(settings), "context_tokens": args.context},
        quantization=args.quantization,
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`plan ...` (as `python modeling_low_vram.py plan` or the `qwen-omni-plan` command)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        argv = argv[1:]
    elif Path(sys.argv[0]).name == "modeling_low_vram.py":
        raise SystemExit(USAGE)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the configs' token-id range notes are not for this table
    return _plan_command(argv)


if __name__ == "__main__":
    sys.exit(main())
