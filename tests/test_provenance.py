"""napo.provenance: what every report records about where it was computed, and whole-file writes."""

import datetime
import json
import os
from pathlib import Path

import PIL
import pytest
import tokenizers
import torch
import transformers

from napo.provenance import (
    available_cores,
    device_description,
    provenance,
    utc_now,
    versions,
    versions_text,
    write_json_atomic,
    write_text_atomic,
)


def test_versions_and_device_are_the_running_ones():
    found = versions()
    assert found["torch"] == torch.__version__ and found["transformers"] == transformers.__version__
    assert versions(("surely-not-a-package-napo",))["surely-not-a-package-napo"] == "not installed"
    assert versions_text({"python": "3.11", "torch": "2.0"}) == "python 3.11, torch 2.0"
    cpu = device_description("cpu")
    assert cpu.startswith("CPU ") and f"{torch.get_num_threads()} torch threads" in cpu
    assert f"({torch.backends.cpu.get_cpu_capability()})" in cpu  # the kernels that decide float rounding
    assert found["pillow"] == PIL.__version__ and found["tokenizers"] == tokenizers.__version__
    assert f"{len(os.sched_getaffinity(0))} cores available" in cpu and available_cores() == len(
        os.sched_getaffinity(0)
    )
    now = datetime.datetime.fromisoformat(utc_now())
    assert now.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - now).total_seconds()) < 5
    assert set(provenance("cpu")) == {"date", "device", "versions"}


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"cells": 3, "where": tmp_path})
    assert json.loads(path.read_text()) == {"cells": 3, "where": str(tmp_path)}

    real = Path.write_text

    def half_then_crash(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_crash)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(path, '{"cells": 4}\n')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"cells": 3, "where": str(tmp_path)}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no half-written temporary left behind
