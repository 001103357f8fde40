"""The GPU check is ready to run: its dry run (the 3B and 7B plans on the meta device) works anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

from qwen_omni_server.local.placement import GiB


def test_gpu_check_dry_run_prints_every_budgets_plan(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model  budget  quant"))
    rows = [line.split() for line in lines[header + 1 :] if line.startswith(("3b ", "7b "))]
    bf16 = {(m, f"{b}.0G", "bf16") for m in ("3b", "7b") for b in (4, 6, 8, 12, 24)}
    quantized = {("3b", "4.0G", "nf4")} | {("7b", f"{b}.0G", "nf4") for b in (6, 8, 12)}
    quantized |= {("7b", f"{b}.0G", "int8") for b in (8, 12)}
    assert {(row[0], row[1], row[2]) for row in rows} == bf16 | quantized
    data = json.loads(report.read_text())
    assert data["dry_run"] is True and len(data["plans"]) == 16 and len(data["rows"]) == 64
    # Quantized rows answer the goal request (text + 1 MP image + 30 s audio) in place of the video.
    assert {r["input"] for r in data["rows"] if r["quantization"] != "none"} == {"text", "image", "audio", "goal"}
    for row in data["rows"]:
        if row["plan_fits"]:  # a plan that says it fits is within its budget, and so is each request on it
            assert row["plan_predicted"] <= row["budget"] * GiB
            assert row["predicted"] <= row["plan_predicted"]
    # The 3B at 8 GiB keeps its whole language model on the GPU; at 4 GiB it is split, and says so.
    assert "lm gpu" in next(line for line in lines if line.startswith("3b     8.0G"))
    assert "cross PCIe every token" in data["plans"]["3b@4.0"]
    assert "host RAM needed" in data["plans"]["7b@8.0"]
    # The quantized plans: the 7B with nf4 keeps its whole language model on an 8 GiB GPU (bf16 there is
    # split) and the 3B with nf4 fits within 4 GiB; their language models are sized quantized.
    assert "lm gpu" in next(line for line in lines if line.startswith("7b     8.0G    nf4"))
    assert "split" in next(line for line in lines if line.startswith("7b     8.0G    bf16"))
    by_key = {(r["model"], r["budget"], r["quantization"], r["input"]): r for r in data["rows"]}
    assert by_key[("7b", 8.0, "nf4", "goal")]["plan_fits"] and by_key[("3b", 4.0, "nf4", "goal")]["plan_fits"]
    assert by_key[("3b", 4.0, "nf4", "goal")]["predicted"] <= 4 * GiB
    assert "nf4" in data["plans"]["7b@8.0/nf4"]
    sizes = {key: value["predicted"] for key, value in data["language_model_bytes"].items()}
    bf16_language_model = by_key[("7b", 24.0, "none", "text")]["predicted_language_model_bytes"]
    assert sizes["7b@8.0/nf4"] < sizes["7b@8.0/int8"] < bf16_language_model
    assert "language model weights 7b@8.0/nf4: predicted" in result.stdout


def run_gpu_check_code(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, 'scripts'); {code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_quantized_rows_say_why_they_are_skipped_without_bitsandbytes():
    """Where bitsandbytes cannot be imported (the GPU machine carries no such wheel), each quantized row
    says so, with how to bring it, and the bf16 rows still run."""
    output = run_gpu_check_code(
        "sys.modules['bitsandbytes'] = None; import json, gpu_check; "
        "missing = gpu_check.bitsandbytes_missing(); "
        "planned = gpu_check.runs(['3b', '7b'], None, ['none', 'nf4', 'int8']); "
        "runnable, skipped = gpu_check.without_bitsandbytes(planned, missing); "
        "print(json.dumps({'missing': missing, 'runnable': runnable, 'skipped': skipped}))"
    )
    data = json.loads(output.strip().splitlines()[-1])
    assert data["missing"].startswith("ModuleNotFoundError")
    assert {(m, s) for m, s, _b in data["runnable"]} == {("3b", "none"), ("7b", "none")}
    assert {(r["model"], r["budget"], r["quantization"]) for r in data["skipped"]} == {
        ("3b", 4.0, "nf4"),
        ("7b", 6.0, "nf4"),
        ("7b", 8.0, "nf4"),
        ("7b", 12.0, "nf4"),
        ("7b", 8.0, "int8"),
        ("7b", 12.0, "int8"),
    }
    for row in data["skipped"]:
        assert row["note"].startswith("skipped: bitsandbytes is not importable here (ModuleNotFoundError")
        assert "install bitsandbytes==0.50.2" in row["note"]
    # Where it is importable (as here), nothing is skipped.
    output = run_gpu_check_code(
        "import gpu_check; missing = gpu_check.bitsandbytes_missing(); print(missing); "
        "print(len(gpu_check.without_bitsandbytes(gpu_check.runs(['7b'], None, ['nf4']), missing)[1]))"
    )
    assert output.strip().splitlines()[-2:] == ["None", "0"]


def test_the_first_audio_rows_run_on_the_tiny_model(tiny_model_dir):
    """The GPU check's speech rows (the talker after the text and beside it), on the CPU: both answer, and the
    pipelined first audio comes before the whole answer's end."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    rows = gpu_check.first_audio_rows(str(tiny_model_dir), device_map="cpu", dtype="float32", tokens=60)
    assert [row["speech_pipeline"] for row in rows] == [False, True]
    for row in rows:
        assert row["tokens"] > 0 and row["first_audio_s"] is not None and row["first_audio_s"] <= row["whole_s"]


def test_the_batching_rows_run_on_the_tiny_model(tiny_model_dir):
    """The GPU check's batching rows, on the CPU: one at a time, batched, and bare batched generate all answer
    every token asked for, and the batched run has a first token for each client."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    rows = gpu_check.batch_rows(str(tiny_model_dir), device_map="cpu", dtype="float32", clients=4, tokens=1)
    alone, batched, bare = rows
    assert (alone["max_batch_size"], batched["max_batch_size"], bare["bare_generate_rows"]) == (1, 4, 4)
    asked = sum(gpu_check.BATCH_LENGTHS)
    assert alone["tokens"] == batched["tokens"] and batched["tokens"] <= asked
    assert batched["ttft_p99_s"] is not None and bare["tokens"] == 4 * gpu_check.BATCH_LENGTHS[0]
