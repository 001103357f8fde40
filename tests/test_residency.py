"""Offloaded weights are copied into one host arena, pinned once at exactly its size: Tensor.pin_memory() on
each weight would take a block of torch's caching host allocator, rounded up to a power of two (a 136 MB
weight in 256 MB). The pinning itself needs CUDA; here a recorder stands in for it."""

from __future__ import annotations

import gc

import torch
from accelerate import cpu_offload

from qwen_omni_server.local import residency
from qwen_omni_server.local.residency import make_resident


class PinningRecorder:
    """Records what would be registered with the CUDA driver, and released."""

    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, pointer: int, size: int) -> bool:
        self.registered.append((pointer, size))
        return True

    def unregister(self, pointer: int) -> None:
        self.unregistered.append(pointer)


def offloaded_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Layers of odd sizes and two dtypes behind accelerate's offload hooks, two of them tied; and the hooks'
    store of weights."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5))
    model[1].weight = model[0].weight  # tied
    model[2].register_buffer("scale", torch.arange(3, dtype=torch.bfloat16))
    cpu_offload(model, execution_device="cpu")
    return model, model[0]._hf_hook.weights_map.dataset


def weight_bytes(store: dict[str, torch.Tensor]) -> list[int]:
    """The bytes of each distinct weight in an offload store (tied ones once)."""
    return list({tensor.data_ptr(): tensor.numel() * tensor.element_size() for tensor in store.values()}.values())


def arena_size(weights: list[int]) -> int:
    """The weights' bytes, each rounded up to the arena's alignment."""
    alignment = residency.ARENA_ALIGNMENT
    return sum(-(-nbytes // alignment) * alignment for nbytes in weights)


def test_offloaded_weights_are_copied_into_one_arena():
    model, store = offloaded_model()
    before = {key: tensor.clone() for key, tensor in store.items()}
    expected = model(torch.ones(1, 8))
    weights = weight_bytes(store)
    assert len(weights) == len(store) - 1 == 6
    on_module = model[2].scale.numel() * model[2].scale.element_size()  # cpu_offload leaves buffers there too
    assert make_resident(model) == sum(weights) + on_module  # the bytes copied, each weight once
    storages = {tensor.untyped_storage().data_ptr() for tensor in store.values()}
    assert len(storages) == 1, f"{len(storages)} allocations for {len(weights)} weights"
    for key, tensor in store.items():
        assert tensor.dtype == before[key].dtype and torch.equal(tensor, before[key]), key
    assert store["0.weight"].data_ptr() == store["1.weight"].data_ptr()  # still tied
    with torch.inference_mode():
        assert torch.equal(model(torch.ones(1, 8)), expected)


def test_the_arena_is_pinned_once_at_its_size_and_released_with_it():
    model, store = offloaded_model()
    size = arena_size(weight_bytes(store))
    pinning = PinningRecorder()
    make_resident(model, pinning=pinning)
    assert pinning.registered == [(min(tensor.data_ptr() for tensor in store.values()), size)]
    pointer = pinning.registered[0][0]
    assert pointer % residency.ARENA_ALIGNMENT == 0 and size < sum(weight_bytes(store)) + 64 * len(weight_bytes(store))
    for tensor in store.values():
        assert pointer <= tensor.data_ptr() < pointer + size and tensor.data_ptr() % residency.ARENA_ALIGNMENT == 0
    assert not pinning.unregistered
    del model, store, tensor
    gc.collect()
    assert pinning.unregistered == [pointer]  # with the last weight in it


def test_without_cuda_nothing_is_pinned():
    assert not torch.cuda.is_available() and residency.default_pinning() is None
    model, _ = offloaded_model()
    expected = model(torch.ones(1, 8))
    assert make_resident(model) > 0 and torch.equal(model(torch.ones(1, 8)), expected)  # copied, unpinned


def test_the_arena_copies_any_tensor():
    tensors = [
        torch.randn(3, 5),
        torch.randn(4, 6).t(),  # not contiguous
        torch.empty(0, 7),
        torch.tensor(2.5, dtype=torch.float64),
        torch.tensor([True, False, True]),
        torch.arange(7, dtype=torch.int8),
    ]
    pinning = PinningRecorder()
    copies = residency.host_arena(tensors, pinning)
    for tensor, copy in zip(tensors, copies):
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and torch.equal(copy, tensor)
        assert copy.data_ptr() % residency.ARENA_ALIGNMENT == 0 or copy.numel() == 0
    assert [size for _, size in pinning.registered] == [arena_size([t.numel() * t.element_size() for t in tensors])]


class FakeCudaRuntime:
    """Stands in for torch.cuda.cudart(): records the calls and answers each with `code` (0 is success)."""

    def __init__(self, code: int) -> None:
        self.code, self.calls = code, []

    def cudaHostRegister(self, pointer: int, size: int, flags: int):
        self.calls.append(("register", pointer, size, flags))
        return torch._C._cudart.cudaError(self.code)

    def cudaHostUnregister(self, pointer: int):
        self.calls.append(("unregister", pointer))
        return torch._C._cudart.cudaError(self.code)


def test_cuda_pinning_registers_the_range_as_it_is_and_survives_a_refusal(caplog):
    runtime = FakeCudaRuntime(0)
    pinning = residency.CudaHostPinning(runtime)
    copies = residency.host_arena([torch.ones(1000), torch.ones(3, dtype=torch.bfloat16)], pinning)
    pointer = copies[0].data_ptr()
    assert runtime.calls == [("register", pointer, 4032 + 64, 0)]  # each copy padded to 64 bytes; flags: default
    del copies
    gc.collect()
    assert runtime.calls[1:] == [("unregister", pointer)]
    refusing = FakeCudaRuntime(2)  # cudaErrorMemoryAllocation
    copies = residency.host_arena([torch.ones(10)], residency.CudaHostPinning(refusing))
    assert torch.equal(copies[0], torch.ones(10)) and "they stay pageable" in caplog.text
    del copies
    gc.collect()
    assert [call[0] for call in refusing.calls] == ["register"]  # never registered: nothing to release
