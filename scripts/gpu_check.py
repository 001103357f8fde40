"""GPU check at real size: does the planner's prediction hold, and how fast is the engine?

    scripts/gpu_check.sh                      # on a CUDA machine: 3B and 7B, budgets 4 6 8 12 24 GiB
    scripts/gpu_check.sh --models 3b --budgets 8
    scripts/gpu_check.sh --dry-run            # anywhere: every budget's plan and prediction, same table
    scripts/gpu_check.sh --quantization none  # the bf16 rows only (the default adds nf4 and int8 rows)

No weights are needed: the real architectures (configs/) are built with random weights directly on
the GPU and saved once as a checkpoint with a tokenizer made here; random weights answer nonsense but
hold the real memory and take the real time. For each budget (enforced with
torch.cuda.set_per_process_memory_fraction) the engine loads it as the server does (DEVICE_MAP=auto,
GPU_MEMORY_GIB=budget: planned, resident, warmed up) and answers, through `OmniEngine.generate`: a
text; a ~1 MP image; 30 s of audio; a 15 s 720p video with its audio (all made with numpy and PIL).
Each row: the prediction for that request (the plan's costs at that request's size), the measured peak
(max_memory_allocated / max_memory_reserved), time to first token, decode tokens/s, the bytes the
offload hooks moved per token, whether it ran out of memory, and bare `model.thinker.generate` on the
same inputs for a tokens/s ratio (ours / bare). The JSON report holds the rows and every plan's table.

Quantized rows (QUANTIZATION nf4 and int8, see quantization.py) load the same checkpoint the server's
way (Settings(quantization=...): bitsandbytes quantizes the decoder layers as they load) at the budgets
of QUANTIZED_BUDGETS, answer the same inputs plus the goal request (text + 1 MP image + 30 s audio), and
add: the planner's language-model bytes against the loaded ones, and their decode tokens/s over the bf16
row's (same model and input, the largest budget of the run; goal: nf4 >= 0.5x). bitsandbytes' wheel
(~125 MB) is over what travels with the tree: where it is not importable, each quantized row says it was
skipped and why, and the bf16 rows still run.

Spoken answers (3B, all on the GPU, bf16): a 200-token answer spoken after the whole text and while it
is written (SPEECH_PIPELINE), seconds to the first audio and to the whole answer (`first_audio` in the
report).

Batching (3B, all on the GPU, bf16): 8 text requests at once, one at a time and batched (MAX_BATCH_SIZE=8),
answer tokens per second and time to first token, and bare batched `thinker.generate` (`batching` in the
report).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import json
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def stand_in_for_unused_audio_libraries() -> None:
    """qwen-omni-utils imports librosa, audioread and av at the top of its package, though the engine
    only calls its vision helpers; where they are not installed (the GPU machine carries no such
    wheels), empty modules stand in so that import succeeds."""
    for name in ("librosa", "audioread", "av"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)


stand_in_for_unused_audio_libraries()

from qwen_omni_server.core.errors import OutOfMemory  # noqa: E402
from qwen_omni_server.core.settings import Settings  # noqa: E402
from qwen_omni_server.core.types import GenerationRequest, VideoInput  # noqa: E402
from qwen_omni_server.local.devices import planning_budgets, resolve_placement  # noqa: E402
from qwen_omni_server.local.engine import OmniEngine  # noqa: E402
from qwen_omni_server.local.loading import MODEL_SHORTHANDS, load_config  # noqa: E402
from qwen_omni_server.local.placement import SPLIT, GiB, build_skeleton, plan_placement  # noqa: E402
from qwen_omni_server.local.quantization import SCHEMES  # noqa: E402

BUDGETS_GIB = (4, 6, 8, 12, 24)
# Quantized rows, per scheme and model: the budgets the goals name (7B nf4 at 6-12 GiB, 3B nf4 within 4 GiB).
QUANTIZED_BUDGETS = {"nf4": {"7b": (6, 8, 12), "3b": (4,)}, "int8": {"7b": (8, 12)}}
DTYPE = torch.bfloat16
NEW_TOKENS = 16
PROMPT = "Describe what you see and hear, in detail."
IMAGE_SIZE = (1280, 800)  # ~1 MP
AUDIO_SECONDS = 30
VIDEO_SECONDS, VIDEO_SIZE = 15, (1280, 720)
# Expected prompt tokens of each input at the default budgets (the dry run has no processor).
EXPECTED_TOKENS = {
    "text": {"text": 58},
    "image": {"text": 58, "image": 1260},
    "audio": {"text": 58, "audio": AUDIO_SECONDS * 25},
    "video": {"text": 60, "video": 3960, "audio": VIDEO_SECONDS * 25},
    "goal": {"text": 60, "image": 1260, "audio": AUDIO_SECONDS * 25},
}
# The inputs each row answers: bf16 as before; quantized rows swap the video for the goal request.
INPUTS = {"none": ("text", "image", "audio", "video"), "quantized": ("text", "image", "audio", "goal")}
BITSANDBYTES_MISSING = (
    "skipped: bitsandbytes is not importable here ({error}); its ~125 MB wheel is over what travels with the "
    "tree: install bitsandbytes==0.50.2 on this machine (pip, or a wheel copied over separately), or carry a "
    "wheel slimmed to this card's CUDA library, then rerun"
)
COLUMNS = (
    ("model", 5),
    ("budget", 6),
    ("quant", 5),
    ("placement", 28),
    ("input", 6),
    ("prompt", 6),
    ("predicted", 9),
    ("allocated", 9),
    ("reserved", 9),
    ("ok", 4),
    ("ttft_s", 7),
    ("tok/s", 7),
    ("bare", 7),
    ("ratio", 5),
    ("vs_bf16", 7),
    ("moved/tok", 9),
    ("oom", 4),
)


# ---------------------------------------------------------------- inputs, made here


def make_inputs() -> dict[str, GenerationRequest]:
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, IMAGE_SIZE[0]), np.linspace(0, 1, IMAGE_SIZE[1]))
    picture = np.stack([x * 255, y * 255, (x * y) * 255], axis=-1).astype(np.uint8)
    t = np.arange(AUDIO_SECONDS * 16_000) / 16_000
    speech_like = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    frames = []
    for index in range(VIDEO_SECONDS * 2):  # VIDEO_FPS frames a second
        frame = np.full((VIDEO_SIZE[1], VIDEO_SIZE[0], 3), (index * 8) % 256, dtype=np.uint8)
        frame[:, (index * 40) % VIDEO_SIZE[0] :][:, :80] = rng.integers(0, 255, 3, dtype=np.uint8)
        frames.append(Image.fromarray(frame))
    track = speech_like[: VIDEO_SECONDS * 16_000].copy()

    def ask(**media) -> GenerationRequest:
        return GenerationRequest(text=PROMPT, system_prompt=None, max_new_tokens=NEW_TOKENS, **media)

    return {
        "text": ask(),
        "image": ask(images=[Image.fromarray(picture)]),
        "audio": ask(audios=[speech_like]),
        "video": ask(videos=[VideoInput(frames=frames, fps=2.0, audio=track)]),
        "goal": ask(images=[Image.fromarray(picture)], audios=[speech_like]),
    }


# ---------------------------------------------------------------- a random checkpoint at real size


def build_checkpoint(model: str, folder: Path, device: str = "cuda") -> Path:
    """The real architecture with random weights (the thinker alone), built on the GPU, saved with a
    tokenizer made here (tiny_model.build_real_size)."""
    import tiny_model

    tiny_model.build_real_size(MODEL_SHORTHANDS[model], folder, device, DTYPE, audio_output=False)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- measuring one request


class Stopwatch:
    """Times every lm_head call (one per token; the first ends the prefill) and counts the bytes
    accelerate's offload hooks bring to the GPU."""

    def __init__(self, model) -> None:
        self.times: list[float] = []
        self.moved_at_token: list[int] = []
        self.moved = 0
        self.handles = [model.thinker.lm_head.register_forward_hook(self._token)]
        for module in model.modules():
            hook = getattr(module, "_hf_hook", None)
            if getattr(hook, "offload", False):
                size = sum(
                    hook.weights_map[name].numel() * hook.weights_map[name].element_size()
                    for name, _ in module.named_parameters(recurse=False)
                    if name in hook.weights_map
                )
                self.handles.append(module.register_forward_pre_hook(lambda *_a, size=size: self._count(size)))

    def _count(self, size: int) -> None:
        self.moved += size

    def _token(self, *_args) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.moved_at_token.append(self.moved)

    def result(self, started: float) -> dict:
        for handle in self.handles:
            handle.remove()
        steps = len(self.times) - 1
        span = self.times[-1] - self.times[0] if steps > 0 else 0
        return {
            "ttft_s": self.times[0] - started if self.times else None,
            "tokens": len(self.times),
            "decode_tokens_per_s": steps / span if span > 0 else None,
            "moved_per_token": (self.moved_at_token[-1] - self.moved_at_token[0]) // steps if steps > 0 else 0,
        }


def run_request(engine: OmniEngine, request: GenerationRequest, bare_too: bool = True) -> dict:
    """Ours through the engine, then (with `bare_too`) bare thinker.generate on the inputs the engine
    passed it."""
    thinker = engine.model.thinker
    original = thinker.generate
    recorded: dict = {}

    def recording(**kwargs):
        recorded.update(kwargs)
        return original(**kwargs)

    thinker.generate = recording
    release()
    torch.cuda.reset_peak_memory_stats()
    watch = Stopwatch(engine.model)
    row: dict = {"oom": False}
    started = time.perf_counter()
    try:
        result = engine.generate(request)
        row.update(prompt_tokens=result.prompt_tokens, by_modality=result.prompt_tokens_by_modality)
    except OutOfMemory as error:
        row.update(oom=True, error=str(error)[:200])
    finally:
        thinker.generate = original
    row.update(watch.result(started))
    row["allocated"] = torch.cuda.max_memory_allocated()
    row["reserved"] = torch.cuda.max_memory_reserved()
    if bare_too and not row["oom"] and recorded:
        bare_args = {k: v for k, v in recorded.items() if k not in ("streamer", "stopping_criteria")}
        bare = Stopwatch(engine.model)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                original(**bare_args)
            row["bare"] = bare.result(started)
        except torch.OutOfMemoryError:
            bare.result(started)
            row["bare"] = {"oom": True}
        del bare_args
    recorded.clear()
    release()
    return row


def request_prediction(config, skeleton, plan, tokens: dict[str, int]) -> int:
    """The plan's placement costed for this request's size: its prompt plus the answer, its patches
    (four per image or video token) and its seconds of audio (25 tokens each)."""
    costed = plan_placement(
        config,
        plan.budget_bytes,
        DTYPE,
        skeleton=skeleton,
        placement=plan.placement,
        gpu_layers=plan.language_model_layers["gpu"] if plan.language_model_layers else None,
        context_tokens=sum(tokens.values()) + NEW_TOKENS,
        max_visual_patches=4 * (tokens.get("image", 0) + tokens.get("video", 0)),
        max_audio_seconds=tokens.get("audio", 0) / 25,
        max_speech_seconds=0,
        quantization=plan.quantization,
    )
    return costed.predicted_gpu_bytes


def placement_summary(plan) -> str:
    if plan is None:
        return "does not fit: cpu"
    lm = plan.placement["language_model"]
    if lm == SPLIT:
        lm = f"split {plan.language_model_layers['gpu']}/{sum(plan.language_model_layers.values())}"
    return f"lm {lm}, enc {plan.placement['visual']}/{plan.placement['audio_tower']}"


# ---------------------------------------------------------------- the table


def gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_row(row: dict) -> str:
    bare = row.get("bare") or {}
    ours_rate, bare_rate = row.get("decode_tokens_per_s"), bare.get("decode_tokens_per_s")
    ratio = ours_rate / bare_rate if ours_rate and bare_rate else None
    measured = row.get("allocated")
    holds = None
    if measured and row.get("predicted") and not row.get("oom"):
        holds = measured <= row["predicted"] <= 1.15 * measured
    cells = [
        row["model"],
        f"{row['budget']}G",
        "bf16" if row.get("quantization", "none") == "none" else row["quantization"],
        row["placement"],
        row["input"],
        str(row.get("prompt_tokens") or row.get("expected_prompt_tokens") or "-"),
        gib(row.get("predicted")),
        gib(measured),
        gib(row.get("reserved")),
        "-" if holds is None else ("yes" if holds else "NO"),
        number(row.get("ttft_s")),
        number(ours_rate, 1),
        number(bare_rate, 1),
        number(ratio),
        number(row.get("vs_bf16")),
        gib(row.get("moved_per_token")) if "moved_per_token" in row else gib(row.get("predicted_moved_per_token")),
        "-" if "oom" not in row else ("OOM" if row["oom"] else "no"),
    ]
    return "  ".join(f"{cell:<{width}}" for cell, (_name, width) in zip(cells, COLUMNS))


def print_table(rows: list[dict]) -> None:
    print("  ".join(f"{name:<{width}}" for name, width in COLUMNS))
    for row in rows:
        print(table_row(row))
        if row.get("note"):
            print(f"    {row['note']}")
    print(
        "predicted/allocated/reserved in GiB (predicted: the plan costed at this request's size); ok: allocated <= "
        "predicted <= 1.15 x allocated; tok/s: decode, ours and bare thinker.generate; moved/tok: GiB the offload "
        "hooks moved per token (dry run: predicted); quant: QUANTIZATION of the language model; vs_bf16: decode "
        "tok/s over the bf16 row's (same model and input, largest budget of this run; goal nf4 >= 0.5)"
    )


# ---------------------------------------------------------------- the runs


def first_audio_rows(path: str, device_map: str = "gpu", dtype: str = "bfloat16", tokens: int = 200) -> list[dict]:
    """A spoken answer of up to `tokens` text tokens, the talker speaking after the whole text and while it is
    written (SPEECH_PIPELINE): seconds to the first audio and to the whole answer, from the request."""
    rows = []
    for pipeline in (False, True):
        settings = Settings(
            _env_file=None,
            model_path=path,
            device_map=device_map,
            dtype=dtype,
            enable_audio_output=True,
            speech_pipeline=pipeline,
            speech_seconds_per_token=0.1,  # a random talker may never end: 2 s + 0.1 s a token at most
        )
        engine = OmniEngine.load(settings)
        try:
            heard: list[float] = []
            request = GenerationRequest(
                "Tell me a long story.", None, max_new_tokens=tokens, return_audio=True, seed=2, temperature=0.0
            )
            engine.generate(dataclasses.replace(request, max_new_tokens=4))  # warm up
            started = time.perf_counter()
            result = engine.generate(
                dataclasses.replace(request, on_audio=lambda _a: heard.append(time.perf_counter()))
            )
            rows.append(
                {
                    "speech_pipeline": pipeline,
                    "tokens": len(result.completion_ids),
                    "first_audio_s": heard[0] - started if heard else None,
                    "whole_s": time.perf_counter() - started,
                    "warnings": result.warnings,
                }
            )
        finally:
            del engine
            release()
    return rows


BATCH_LENGTHS = (64, 128, 96, 160)  # the answer lengths the batching rows' clients ask for, in turn


def batch_rows(
    path: str, device_map: str = "gpu", dtype: str = "bfloat16", clients: int = 8, tokens: int = 1
) -> list[dict]:
    """`clients` text requests at once (answers of BATCH_LENGTHS x `tokens` tokens, in turn), one at a time
    (MAX_BATCH_SIZE=1) and batched (MAX_BATCH_SIZE=`clients`), through the engine's worker as the server runs
    them: answer tokens per second, time to first token p50 and p99, the whole time; and bare
    `thinker.generate` of the same prompts as one left-padded batch (tokens per second)."""
    rows = []
    for batch in (1, clients):
        settings = Settings(_env_file=None, model_path=path, device_map=device_map, dtype=dtype, max_batch_size=batch)
        engine = OmniEngine.load(settings)
        try:
            rows.append({"max_batch_size": batch, **_concurrent(engine, clients, tokens)})
            if batch > 1:
                rows.append({"bare_generate_rows": clients, **_bare_batch(engine, clients, BATCH_LENGTHS[0] * tokens)})
        finally:
            engine.close()
            del engine
            release()
    return rows


def _concurrent(engine: OmniEngine, clients: int, tokens: int) -> dict:
    worker = engine.new_worker(clients)
    first: list[float] = []
    started = time.perf_counter()

    def request(index: int) -> GenerationRequest:
        seen: list[bool] = []

        def on_text(_text: str) -> None:
            if not seen:
                seen.append(True)
                first.append(time.perf_counter() - started)

        text = f"Request {index}: tell me a long story about the sea."
        return GenerationRequest(text, None, max_new_tokens=BATCH_LENGTHS[index % 4] * tokens, on_text=on_text)

    futures = [worker.submit(engine.generate, request(i)) for i in range(clients)]
    answered = sum(future.result().completion_tokens for future in futures)
    seconds = time.perf_counter() - started
    worker.shutdown()
    return {
        "clients": clients,
        "tokens": answered,
        "seconds": seconds,
        "tokens_per_s": answered / seconds,
        "ttft_p50_s": float(np.percentile(first, 50)) if first else None,
        "ttft_p99_s": float(np.percentile(first, 99)) if first else None,
    }


def _bare_batch(engine: OmniEngine, rows: int, tokens: int) -> dict:
    processor = engine.processor
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": f"Request {i}: tell me a long story about the sea."}],
                }
            ],
            add_generation_prompt=True,
        )
        for i in range(rows)
    ]
    inputs = processor(text=texts, return_tensors="pt", padding=True).to(engine.model.thinker.device)
    with torch.inference_mode():
        started = time.perf_counter()
        engine.model.thinker.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - started
    return {"tokens": rows * tokens, "seconds": seconds, "tokens_per_s": rows * tokens / seconds}


def settings_for(model_path: str, budget: float, quantization: str = "none") -> Settings:
    return Settings(
        _env_file=None,
        model_path=model_path,
        device_map="auto",
        gpu_memory_gib=budget,
        dtype="bfloat16",
        quantization=quantization,
    )


def runs(models: list[str], budgets: list[float] | None, schemes: list[str]) -> list[tuple[str, str, list[float]]]:
    """(model, scheme, budgets) in the order they run: each model's bf16 rows first, then its quantized
    ones. Explicit `budgets` apply to every scheme; otherwise bf16 gets BUDGETS_GIB and a quantized
    scheme its QUANTIZED_BUDGETS (a model with none there gets no rows of that scheme)."""
    planned = []
    for model in models:
        for scheme in schemes:
            if budgets is not None:
                chosen = list(budgets)
            elif scheme == "none":
                chosen = [float(b) for b in BUDGETS_GIB]
            else:
                chosen = [float(b) for b in QUANTIZED_BUDGETS.get(scheme, {}).get(model, ())]
            if chosen:
                planned.append((model, scheme, chosen))
    return planned


def plan_key(model: str, budget: float, scheme: str) -> str:
    return f"{model}@{budget}" if scheme == "none" else f"{model}@{budget}/{scheme}"


def inputs_for(scheme: str) -> tuple[str, ...]:
    return INPUTS["none" if scheme == "none" else "quantized"]


def bitsandbytes_missing() -> str | None:
    """Why bitsandbytes cannot be imported here, or None when it can."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as error:  # noqa: BLE001 - an ImportError, or a broken native library
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def compare_with_bf16(rows: list[dict]) -> None:
    """Each quantized row's decode tokens/s over the bf16 row of the same model and input at the largest
    budget where it answered (its most resident placement) in this run."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.get("quantization", "none") == "none" and row.get("decode_tokens_per_s"):
            key = (row["model"], row["input"])
            if key not in best or row["budget"] > best[key]["budget"]:
                best[key] = row
    for row in rows:
        reference = best.get((row["model"], row["input"]))
        if row.get("quantization", "none") != "none" and reference and row.get("decode_tokens_per_s"):
            row["vs_bf16"] = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
            row["bf16_reference"] = f"{reference['model']}@{reference['budget']}"


def dry_run(planned: list[tuple[str, str, list[float]]], report: dict) -> list[dict]:
    rows = []
    skeletons: dict = {}
    for model, scheme, budgets in planned:
        if model not in skeletons:
            config = load_config(str(MODEL_SHORTHANDS[model]))
            config.enable_audio_output = False
            skeletons[model] = (config, build_skeleton(config))
        config, skeleton = skeletons[model]
        for budget in budgets:
            settings = settings_for(str(MODEL_SHORTHANDS[model]), budget, scheme)
            plan = plan_placement(
                config, int(budget * GiB), DTYPE, skeleton=skeleton, **planning_budgets(settings), quantization=scheme
            )
            report["plans"][plan_key(model, budget, scheme)] = plan.table()
            if scheme != "none":
                report["language_model_bytes"][plan_key(model, budget, scheme)] = {
                    "predicted": plan.components["language_model"].bytes,
                    "loaded": None,
                }
            for kind in inputs_for(scheme):
                tokens = EXPECTED_TOKENS[kind]
                rows.append(
                    {
                        "model": model,
                        "budget": budget,
                        "quantization": scheme,
                        "placement": placement_summary(plan if plan.fits else None),
                        "input": kind,
                        "expected_prompt_tokens": sum(tokens.values()),
                        "predicted": request_prediction(config, skeleton, plan, tokens) if plan.fits else None,
                        "plan_predicted": plan.predicted_gpu_bytes,
                        "plan_fits": plan.fits,
                        "predicted_moved_per_token": plan.moved_per_token,
                        "predicted_language_model_bytes": plan.components["language_model"].bytes,
                    }
                )
    return rows


def without_bitsandbytes(planned: list[tuple[str, str, list[float]]], missing: str | None) -> tuple[list, list[dict]]:
    """The runs that can go ahead, and one row per quantized (model, budget) that cannot because
    bitsandbytes is not importable (`missing` says why), saying so and how to bring it."""
    if not missing:
        return planned, []
    note = BITSANDBYTES_MISSING.format(error=missing)
    skipped = [
        {"model": m, "budget": b, "quantization": s, "placement": "-", "input": "-", "skipped": True, "note": note}
        for m, s, budgets in planned
        if s != "none"
        for b in budgets
    ]
    return [run for run in planned if run[1] == "none"], skipped


def gpu_run(planned: list[tuple[str, str, list[float]]], report: dict, out: Path) -> list[dict]:
    missing = bitsandbytes_missing() if any(scheme != "none" for _m, scheme, _b in planned) else None
    report["bitsandbytes"] = missing or "importable"
    planned, rows = without_bitsandbytes(planned, missing)
    for row in rows:
        print(f"{row['model']} {row['quantization']} at {row['budget']} GiB {row['note']}", flush=True)
    inputs = make_inputs()
    for model in dict.fromkeys(m for m, _s, _b in planned):
        with tempfile.TemporaryDirectory(prefix=f"qwen-omni-{model}-") as folder:
            started = time.perf_counter()
            try:
                path = str(build_checkpoint(model, Path(folder)))
            except Exception as error:  # noqa: BLE001 - the report says why, and the next model still runs
                rows.append({"model": model, "budget": 0, "placement": "-", "input": "build", "error": repr(error)})
                print(f"{model}: could not build the checkpoint: {error!r}", flush=True)
                continue
            report["build_seconds"][model] = time.perf_counter() - started
            config = load_config(path)
            config.enable_audio_output = False
            skeleton = build_skeleton(config)
            for scheme, budgets in ((s, b) for m, s, b in planned if m == model):
                for budget in budgets:
                    base = {"model": model, "budget": budget, "quantization": scheme}
                    rows += run_budget(path, config, skeleton, base, inputs, report)
                    out.write_text(json.dumps({**report, "rows": rows}, indent=2, default=str))
            if model == "3b":
                report["first_audio"] = recorded(first_audio_rows, path, spoken_line)
                report["batching"] = recorded(batch_rows, path, lambda row: f"3b batching: {json.dumps(row)}")
    return rows


def recorded(measure: Callable[[str], list[dict]], path: str, line: Callable[[dict], str]) -> list[dict]:
    """`measure(path)`'s rows on the GPU, each printed as `line` says; an error is recorded, not raised."""
    try:
        rows = measure(path)
    except Exception as error:  # noqa: BLE001 - recorded; the rest of the report stands
        return [{"error": repr(error)[:400]}]
    for row in rows:
        print(line(row), flush=True)
    return rows


def spoken_line(row: dict) -> str:
    mode = "pipelined" if row["speech_pipeline"] else "after the text"
    return (
        f"3b speech, {mode}: {row['tokens']} tokens, first audio {row['first_audio_s']} s, whole {row['whole_s']:.2f} s"
    )


def run_budget(path: str, config, skeleton, base: dict, inputs: dict, report: dict) -> list[dict]:
    """Load the checkpoint as the server would at this budget and scheme, and answer the scheme's inputs."""
    model, budget, scheme = base["model"], base["budget"], base["quantization"]
    settings = settings_for(path, budget, scheme)
    plan = resolve_placement(settings, copy.deepcopy(config)).plan
    base = {**base, "placement": placement_summary(plan)}
    if plan is None:
        return [{**base, "input": "-", "note": "the plan does not fit: the server would use the CPU"}]
    key = plan_key(model, budget, scheme)
    report["plans"][key] = plan.table()
    rows = []
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GiB / total))
    engine = None
    try:
        engine = OmniEngine.load(settings)
        description = engine.describe()
        report["startup"][key] = description.get("startup")
        if scheme != "none":  # the planner's language-model bytes against the loaded ones
            report["language_model_bytes"][key] = {
                "predicted": plan.components["language_model"].bytes,
                "loaded": description.get("quantization", {}).get("language_model_bytes"),
            }
        for kind in inputs_for(scheme):
            # Bare generate where nothing crosses PCIe per token (the ratio's goal); elsewhere
            # both run the same offload hooks and only double the time.
            row = {**base, "input": kind, **run_request(engine, inputs[kind], plan.moved_per_token == 0)}
            if "by_modality" in row:
                row["predicted"] = request_prediction(config, skeleton, plan, row["by_modality"])
            rows.append(row)
            print(table_row(row), flush=True)
    except torch.OutOfMemoryError as error:  # loading or warming up ran out
        rows.append({**base, "input": "load", "oom": True, "error": str(error)[:200]})
    except Exception as error:  # noqa: BLE001 - recorded; the next budget still runs
        rows.append({**base, "input": "error", "error": repr(error)[:400]})
        print(f"{model} {scheme} at {budget} GiB failed: {error!r}", flush=True)
    finally:
        del engine
        release()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="plans on the meta device only (no GPU needed)")
    parser.add_argument("--models", default="3b,7b", help="comma-separated: 3b, 7b")
    parser.add_argument(
        "--budgets",
        default=None,
        help=f"GPU budgets in GiB for every scheme (default: {','.join(map(str, BUDGETS_GIB))} for bf16, "
        "QUANTIZED_BUDGETS for nf4/int8)",
    )
    parser.add_argument(
        "--quantization",
        default="none,nf4,int8",
        help="comma-separated QUANTIZATION schemes to run: none (the bf16 rows), nf4, int8",
    )
    parser.add_argument("--out", default="bench/out/gpu_check_report.json", help="the JSON report")
    args = parser.parse_args(argv)
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    budgets = None if args.budgets is None else [float(b) for b in args.budgets.split(",") if b.strip()]
    schemes = [q.strip().lower() for q in args.quantization.split(",") if q.strip()]
    unknown = sorted(set(models) - set(MODEL_SHORTHANDS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODEL_SHORTHANDS)}")
    if sorted(set(schemes) - set(SCHEMES)):
        parser.error(f"unknown quantization {sorted(set(schemes) - set(SCHEMES))}; choose from {list(SCHEMES)}")
    planned = runs(models, budgets, schemes)
    report: dict = {
        "dry_run": args.dry_run,
        "plans": {},
        "startup": {},
        "build_seconds": {},
        "language_model_bytes": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        rows = dry_run(planned, report)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run for the plans alone")
            return 2
        report["device"] = torch.cuda.get_device_name(0)
        report["versions"] = {
            "torch": torch.__version__,
            "transformers": importlib.import_module("transformers").__version__,
        }
        print(f"GPU: {report['device']}, {report['versions']}", flush=True)
        rows = gpu_run(planned, report, out)
        compare_with_bf16(rows)
    print_table(rows)
    for key, sizes in report["language_model_bytes"].items():
        print(
            f"language model weights {key}: predicted {gib(sizes['predicted'])} GiB, loaded {gib(sizes['loaded'])} GiB"
        )
    out.write_text(json.dumps({**report, "rows": rows}, indent=2, default=str))
    print(f"report: {out}")
    failed = [r for r in rows if r.get("predicted") and r.get("allocated") and r["allocated"] > r["predicted"]]
    return 1 if failed else 0


if __name__ == "__main__":
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    sys.exit(main())
