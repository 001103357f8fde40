"""Memory at real size without a GPU: the live-bytes tracker against the CPU allocator, and the memory check
(scripts/memory_check.py) on the real 3B and 7B architectures, whose every row must meet its goal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from qwen_omni_server.local.live_bytes import LiveBytes
from qwen_omni_server.local.loading import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import memory_check


def test_live_bytes_counts_new_storages_until_they_are_freed():
    weight = torch.ones(256, 256)
    with LiveBytes() as live:
        product = weight @ weight  # 256 KiB
        view = product[:10]  # a view: no new storage
        assert live.live == 256 * 1024 and live.peak == 256 * 1024
        del product, view
        assert live.live == 0
        small = torch.ones(3)  # 12 bytes, counted as one 512-byte block
        assert live.live == 512 and live.peak == 256 * 1024
        del small
    assert weight.sum() == 256 * 256  # the weight existed before: never counted


def cpu_allocator_peak(run) -> int:
    """The CPU allocator's own peak over `run`, from the profiler's allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = sorted(
        (e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("tokens", [512, 2048])
def test_the_tracker_agrees_with_the_cpu_allocator_at_real_width(tokens):
    """Two decoder layers of the real 3B at their real width (a small vocabulary), bf16, real tensors."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

    text = load_config(str(ROOT / "configs" / "qwen2.5-omni-3b.config.json")).thinker_config.text_config
    text.num_hidden_layers, text.vocab_size = 2, 1024
    text.layer_types = text.layer_types[:2]
    model = Qwen2_5OmniThinkerTextModel(text).to(torch.bfloat16).eval()
    ids, positions = torch.zeros(1, tokens, dtype=torch.long), torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids, position_ids=positions, use_cache=True)

    with LiveBytes() as live:
        prefill()
    allocator = cpu_allocator_peak(prefill)
    assert allocator > tokens * text.intermediate_size * 2  # it saw the MLP's products
    assert abs(live.peak - allocator) <= 0.02 * allocator


def test_the_memory_check_meets_its_goals_on_the_real_architectures(tmp_path, capsys):
    """Every request shape and planner row of 3B and 7B: tracked <= predicted <= 1.15 x tracked + 64 MiB, and
    no plan that says it fits exceeds its budget once the tracked peak and the fixed costs are added."""
    out = tmp_path / "memory_check.json"
    status = memory_check.main(["--models", "3b,7b", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    missed = [row for row in report["shapes"] + report["batches"] + report["plans"] if not row["ok"]]
    assert status == 0 and not missed, printed
    batches = {(row["model"], row["rows"]): row["tracked"] for row in report["batches"]}
    for model in ("3b", "7b"):  # each row's cache at the whole context: eight rows hold about twice four's
        assert 1.6 < batches[model, 8] / batches[model, 4] < 2.0
    shapes = {(row["model"], row["shape"]): row for row in report["shapes"]}
    for model in ("3b", "7b"):
        # token2wav goes chunk by chunk: flat in the answer's length (whole, it was 0.24 GiB at 10 s, 31.9 at 180 s).
        # The talker's cache grows by its codes, and the thinker's states by the answer's text, as they must.
        synthesis = [shapes[model, f"speech {seconds} s"]["tracked"]["token2wav"] for seconds in (10, 180)]
        assert synthesis[1] <= 1.2 * synthesis[0]
        assert shapes[model, "image"]["tracked"]["vision"] > 1 << 30  # the real encoder ran at full size
    assert {row["quantization"] for row in report["plans"]} == {"none", "nf4", "int8"}


def test_a_prediction_below_the_tracked_peak_misses_the_goal():
    assert memory_check.within_goal(100 << 20, 110 << 20)
    assert not memory_check.within_goal(100 << 20, 99 << 20)  # too low: the plan would run out of memory
    assert not memory_check.within_goal(100 << 20, 200 << 20)  # too high: memory left unused
