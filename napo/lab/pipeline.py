"""The vision bias lab's public names, where earlier code imports them: the engine (`napo.lab.engine`: prepare,
train, evaluate, run, report), the vision task (`napo.lab.vision`: settings, rows, pairs, metrics) and its report
(`napo.lab.vision_report`). New code imports from those modules.
"""

from napo.lab.engine import (
    evaluate_lab_model,
    lab_spec,
    lab_training_config,
    prepare_lab,
    run_lab,
    train_lab_model,
)
from napo.lab.sft import supervised_fine_tune
from napo.lab.tasks import SFT_GATE, sft_gate
from napo.lab.vision import PAIR_METADATA, PER_NOISE_SPLITS, POPE_SPLITS, LabSettings, _rows, general_negative
from napo.lab.vision_report import REPORT_METRICS, budget_note, render_report

__all__ = [
    "PAIR_METADATA",
    "PER_NOISE_SPLITS",
    "POPE_SPLITS",
    "REPORT_METRICS",
    "SFT_GATE",
    "LabSettings",
    "_rows",
    "budget_note",
    "evaluate_lab_model",
    "general_negative",
    "lab_spec",
    "lab_training_config",
    "prepare_lab",
    "render_report",
    "run_lab",
    "sft_gate",
    "supervised_fine_tune",
    "train_lab_model",
]
