"""What makes a loaded model ready and keeps it serving: weights resident in memory, encoders that run
on the CPU for real, logits for the last position only, a warm-up, and recovery from out-of-memory.

- `make_resident`: transformers maps checkpoint files into memory and reads them on first use, so a
  server that says ready would pay for the disk on its first request; every weight is copied in, the
  offloaded ones into one arena pinned as it is (`host_arena`: pinned bytes = the weights' bytes).
- `run_on_cpu`: accelerate runs a module mapped to `cpu` in a GPU map *on the GPU*, streaming its
  weights in at each call; this puts an encoder's weights back on the CPU and computes there, so only
  its inputs and output embeddings cross PCIe.
- `keep_last_logits`: the thinker's forward has no `logits_to_keep`, so the prefill would build logits
  for every prompt position (8192 x 151936 in bf16 is 2.3 GiB); generation reads only the last. The
  talker's prefill likewise (8192 x 8448, in bf16 and again in float32: 0.39 GiB).
- `recovers_from_out_of_memory`: a request that runs out of memory fails alone, with advice (the speech
  settings first when it ran out while speaking), and leaves nothing allocated behind it.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from qwen_omni_server.core.audio import INPUT_SAMPLE_RATE
from qwen_omni_server.core.errors import OutOfMemory
from qwen_omni_server.core.types import GenerationRequest

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- weights in memory


def make_resident(model: torch.nn.Module, pinning: HostPinning | None = None) -> int:
    """Copy every host-side weight into ordinary memory, away from the memory-mapped checkpoint, the offloaded
    ones into one arena that `pinning` pins (by default CudaHostPinning, where CUDA is available); returns the
    bytes copied. Tied weights stay tied."""
    copied = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in seen or tensor.device.type != "cpu":
                continue
            seen.add(id(tensor))
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    pinning = pinning if pinning is not None else default_pinning()
    return copied + _offloaded_into_arena(_offload_stores(model), pinning)


def _offloaded_into_arena(stores: list[dict[str, torch.Tensor]], pinning: HostPinning | None) -> int:
    """Replace the offloaded weights behind accelerate's hooks by copies in one host arena (pinned memory
    speeds their copies to the GPU); returns the bytes copied."""
    stores = list({id(store): store for store in stores}.values())
    originals: dict[tuple, torch.Tensor] = {}
    for store in stores:
        for tensor in store.values():
            if tensor.device.type == "cpu":
                originals.setdefault(_identity(tensor), tensor)
    copies = dict(zip(originals, host_arena(list(originals.values()), pinning)))
    for store in stores:
        for key, tensor in store.items():
            if tensor.device.type == "cpu":
                store[key] = copies[_identity(tensor)]
    return sum(tensor.numel() * tensor.element_size() for tensor in originals.values())


def _identity(tensor: torch.Tensor) -> tuple:
    """Tensors with the same identity are one weight (tied ones): they get one copy."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())


ARENA_ALIGNMENT = 64  # bytes: each copy starts on a cache line, aligned for every dtype


def host_arena(
    tensors: list[torch.Tensor], pinning: HostPinning | None = None, alignment: int = ARENA_ALIGNMENT
) -> list[torch.Tensor]:
    """Copies of `tensors` in one ordinary host allocation, each at an aligned offset; it lives as long as any
    copy does. With `pinning`, the allocation is registered once, exactly its size, and unregistered when it
    is freed."""
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += -(-tensor.numel() * tensor.element_size() // alignment) * alignment
    buffer = np.empty(size + alignment, dtype=np.uint8)  # the torch tensors below keep it alive
    start = -buffer.ctypes.data % alignment
    arena = torch.from_numpy(buffer)[start : start + size]
    copies = []
    with torch.no_grad():
        for tensor, offset in zip(tensors, offsets):
            piece = arena[offset : offset + tensor.numel() * tensor.element_size()]
            copies.append(piece.view(tensor.dtype).view(tensor.shape).copy_(tensor))
    if pinning is not None and size and pinning.register(arena.data_ptr(), size):
        weakref.finalize(buffer, pinning.unregister, arena.data_ptr()).atexit = False  # the process frees it all
    return copies


class HostPinning(Protocol):
    """Page-locks a range of host memory for the GPU (whether it did), and releases it."""

    def register(self, pointer: int, size: int) -> bool: ...

    def unregister(self, pointer: int) -> None: ...


def default_pinning() -> CudaHostPinning | None:
    """Pinning where CUDA is available (pinned memory speeds the copies to the GPU), none elsewhere."""
    return CudaHostPinning() if torch.cuda.is_available() else None


class CudaHostPinning:
    """Registers host memory with the CUDA driver as it is, exactly the range given. (Tensor.pin_memory() copies
    into torch's caching host allocator instead, whose blocks are rounded up to a power of two: a 136 MB weight
    takes 256 MB.) A range that cannot be pinned stays pageable: its copies to the GPU are slower, not wrong."""

    def __init__(self, runtime: Any = None) -> None:
        self.runtime = runtime  # torch.cuda.cudart() when None (tests give a stand-in: there is no GPU)

    def _cudart(self) -> Any:
        return self.runtime if self.runtime is not None else torch.cuda.cudart()

    def register(self, pointer: int, size: int) -> bool:
        try:
            torch.cuda.check_error(int(self._cudart().cudaHostRegister(pointer, size, 0)))
        except (RuntimeError, AssertionError) as error:  # CudaError, or a torch without the CUDA runtime
            logger.warning("could not pin %.2f GiB of offloaded weights (%s): they stay pageable", size / 2**30, error)
            return False
        logger.info("offloaded weights: %.2f GiB of host memory pinned", size / 2**30)
        return True

    def unregister(self, pointer: int) -> None:
        try:
            torch.cuda.check_error(int(self._cudart().cudaHostUnregister(pointer)))
        except RuntimeError as error:
            logger.warning("could not unpin the offloaded weights' memory (%s)", error)


def _offload_stores(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """The dicts of offloaded weights behind accelerate's hooks (dispatch_model keeps them in an
    OffloadedWeightsLoader's state_dict, cpu_offload in a plain dict)."""
    stores = []
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        dataset = getattr(weights, "dataset", None)
        store = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", None)
        if isinstance(store, dict):
            stores.append(store)
    return stores


def run_on_cpu(module: torch.nn.Module) -> None:
    """Make `module` compute on the CPU: its weights come back from accelerate's offload hooks, its
    inputs move to the CPU and its outputs back to the device its inputs came from."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is None:
            continue
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if name in weights:
                set_module_tensor_to_device(sub, name, "cpu", value=weights[name])
            elif tensor.device.type != "cpu":
                set_module_tensor_to_device(sub, name, "cpu", value=tensor.to("cpu"))
    remove_hook_from_module(module, recurse=True)
    module.to("cpu")
    add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))


# ---------------------------------------------------------------- logits of the last position


def keep_last_logits(lm_head: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Give `lm_head` only the last position of a multi-position input (the prefill): generation
    reads nothing else (`logits[:, -1, :]`), and the speech path reads hidden states, not logits."""

    def last_position(_module, args):
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[1] > 1:
            return (hidden[:, -1:, :], *args[1:])
        return None

    return lm_head.register_forward_pre_hook(last_position)


# ---------------------------------------------------------------- warm-up


def warm_up(engine) -> float:
    """Run a short request through every loaded component (both encoders and the thinker; with speech,
    the talker and token2wav too); returns its seconds. A failed speech warm-up is logged, not fatal:
    text answers still work."""
    started = time.perf_counter()
    request = GenerationRequest(
        text="Hi.",
        system_prompt=None,
        images=[Image.new("RGB", (56, 56), (128, 96, 64))],
        audios=[np.zeros(INPUT_SAMPLE_RATE, dtype=np.float32)],  # a second of silence
        max_new_tokens=2,
    )
    engine.generate(request)
    if engine.settings.enable_audio_output and engine.voices:
        settings = engine.settings
        engine.settings = settings.model_copy(update={"max_speech_seconds": 1.0})  # a few codec tokens suffice
        try:
            engine.generate(GenerationRequest(text="Hi.", system_prompt=None, max_new_tokens=2, return_audio=True))
        except Exception as error:  # noqa: BLE001 - the server still answers in text; the log says why
            logger.warning("the speech warm-up failed (%s: %s); spoken answers may fail", type(error).__name__, error)
        finally:
            engine.settings = settings
    return time.perf_counter() - started


# ---------------------------------------------------------------- out of memory


def release_cached_memory() -> None:
    """Drop what a failed request left: unreachable tensors, then the CUDA allocator's cache."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class OutOfMemoryWhileSpeaking(torch.OutOfMemoryError):
    """Out of memory in the talker or token2wav, after the thinker had written the answer."""


def out_of_memory_advice(settings, placement: dict[str, str], speaking: bool = False) -> str:
    """What to lower so that the next request fits, in the settings' own names: when it ran out while
    speaking, the speech settings first (the talker's prefill reads the whole prompt, so the budgets follow)."""
    preset = (
        "DEVICE_MAP=low-vram-cpu (the encoders run on the CPU)"
        if placement.get("visual") == "offload"
        else "DEVICE_MAP=low-vram (the encoders' weights leave the GPU)"
    )
    general = (
        f"lower IMAGE_MAX_PIXELS (now {settings.image_max_pixels}), VIDEO_TOTAL_PIXELS (now "
        f"{settings.video_total_pixels}) or MAX_CONTEXT_TOKENS (now {settings.max_context_tokens}), send smaller "
        f"or fewer files, or use {preset} or a lower GPU_MEMORY_GIB so the plan leaves more room"
    )
    if not speaking:
        return general
    return (
        f"lower SPEECH_CHUNK_BLOCKS (now {settings.speech_chunk_blocks}: token2wav's DiT blocks per chunk) or "
        f"MAX_SPEECH_SECONDS (now {settings.max_speech_seconds:g}: the talker's cache grows with the speech), ask "
        f"for a text answer, or {general}"
    )


def recovers_from_out_of_memory(generate: Callable) -> Callable:
    """Turn torch.OutOfMemoryError in `generate` into OutOfMemory, after the failed request's tensors
    are gone and the allocator's cache is freed, so that the next request is served."""

    @functools.wraps(generate)
    def guarded(engine, request: GenerationRequest):
        try:
            return generate(engine, request)
        except torch.OutOfMemoryError as error:
            reason = (str(error).splitlines() or ["out of memory"])[0]
            speaking = isinstance(error, OutOfMemoryWhileSpeaking)
        # Outside the except block: the traceback, and the request's tensors its frames held, are gone.
        release_cached_memory()
        when = " while speaking its answer" if speaking else ""
        logger.warning("a request ran out of memory%s (%s); the cache was freed", when, reason)
        raise OutOfMemory(
            f"the model ran out of memory on this request{when}; retry with smaller inputs, or "
            f"{out_of_memory_advice(engine.settings, engine.placement.components, speaking)}"
        )

    return guarded
