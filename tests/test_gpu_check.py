"""The GPU check is ready to run: its dry run (the 3B and 7B plans on the meta device) works anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

from placement import GiB


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
    header = next(i for i, line in enumerate(lines) if line.startswith("model  budget"))
    rows = [line.split() for line in lines[header + 1 :] if line.startswith(("3b ", "7b "))]
    assert {(row[0], row[1]) for row in rows} == {(m, f"{b}.0G") for m in ("3b", "7b") for b in (4, 6, 8, 12, 24)}
    data = json.loads(report.read_text())
    assert data["dry_run"] is True and len(data["plans"]) == 10 and len(data["rows"]) == 40
    for row in data["rows"]:
        if row["plan_fits"]:  # a plan that says it fits is within its budget, and so is each request on it
            assert row["plan_predicted"] <= row["budget"] * GiB
            assert row["predicted"] <= row["plan_predicted"]
    # The 3B at 8 GiB keeps its whole language model on the GPU; at 4 GiB it is split, and says so.
    assert "lm gpu" in next(line for line in lines if line.startswith("3b     8.0G"))
    assert "cross PCIe every token" in data["plans"]["3b@4.0"]
    assert "host RAM needed" in data["plans"]["7b@8.0"]
