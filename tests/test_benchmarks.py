"""The benchmarks' smoke mode runs in the test suite, so that they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_mode_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--smoke",
            "--only",
            "train,padfree,scaling,extract,stream,choice",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["train"]] == ["plain SFT", "emotune terms", "emotune terms + drift"]
    assert data["train"][0]["ratio_vs_plain"] == 1.0 and all(r["step_s"] > 0 for r in data["train"])
    assert {r["factor"] for r in data["scaling"]} == {"length", "batch", "emotions", "layers"}
    assert len(data["scaling"]) == 12
    assert data["extract"][-1]["ratio_vs_bare"] < 0.10  # padding waste after length bucketing
    assert data["choice"][1]["speedup_vs_separate"] > 0
    assert [r["variant"] for r in data["padfree"]] == ["padded", "padding-free"]
    assert data["padfree"][0]["padding_fraction"] > 0 and data["padfree"][1]["padding_fraction"] == 0
    stream = {(r["mode"], r["multiple"]): r for r in data["stream"]}
    assert stream["streamed", 3]["stories"] == 3 * stream["streamed", 1]["stories"]
    assert {r["mode"] for r in data["stream"]} == {"in memory (baseline)", "streamed"}
    assert "## Training step" in result.stdout
