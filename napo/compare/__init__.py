"""`napo compare`: preference objectives x label-noise rates x seeds, every cell from the same model and pairs.

A *cell* is one (objective, noise rate, seed). The seed is a *replicate*: in the lab (unless `shared_sft`)
each replicate has its own SFT model (init and batch order) and its own sampled pairs; the cell's
seed also picks which `round(rate · rows)` rows get noise — flipped (`noise_kind="flip"`, `napo.pairs`'
label-noise injection) or misannotated (`"annotator"`, `napo.lab.noise.annotator_noise`) — so every objective of
a (rate, seed) sees exactly the same noisy rows: the comparison is paired. A trained cell is evaluated and its
row appended to `results.jsonl`:

    {"key": "napo-paper/noise=0.2/seed=1", "objective": "napo-paper", "noise_kind": "flip", "noise_rate": 0.2,
     "seed": 1, "replicate": 1, "pair_labels": {"pair_label_language_bias": {"clean": 812, "tie": 401, ...}},
     "label_smoothing": null, "source_dir": "<out>/lab/cache/<hash of the lab's settings>",
     "source_digest": "<hash of the SFT weights and the pair rows>", "metrics": {...},
     "train_wall_s": 14.2, "cell_wall_s": 31.0,
     "margins": {"clean_mean": ..., "flipped_mean": ..., "clean_fitted": ..., "flipped_fitted": ..., ...},
     "q_trajectory": {"language_bias": [[step, q], ...]}, "finished": "2026-11-25T03:40:00+00:00"}

Two sources of model and pairs:

- the bias lab (default): `napo.lab.engine.prepare_lab` builds the SFT model and pairs once; metrics are the lab's
  (`evaluate_lab_model`: counterfactual / prior-consistent accuracy, blind agreement, POPE, CHAIR, ...);
- a user's preference dataset and model (`dataset` + `model`): a clean held-out split (`holdout` of the rows,
  never noised) is set aside; metrics are the reward accuracy and mean margin of the trained model on it.

Resumable: a cell whose key is in `results.jsonl` is skipped; a cell that raised is recorded in `errors.jsonl`
and retried on the next run. Output layout under `output_dir`:

    results.jsonl   one line per finished cell        errors.jsonl    one line per failed attempt
    summary.csv     mean and std over seeds           README.md       the report (tables, verdict)
    metrics_vs_noise.png  q_trajectory.png  margins_clean_vs_flipped.png
    lab/cache/<hash> or data/<hash>   the shared SFT model and pairs; a row's `source_dir` names the one it used
                                      (and in the lab `source_digest` its content), and only rows of the current
                                      source count as done or enter the report: in the lab, a cache rebuilt in
                                      another folder or session counts when its weights and pairs are the same
    cells/<key>/    a cell's training folder (removed after success unless keep_models)

The package, one job per module: `grid` (CompareConfig, recipes, the objective-name grammar read from
`napo.objectives.OBJECTIVES`, cell keys), `source` (the shared SFT model and pairs), `cell` (one cell: noise, train
through `napo.training.train_preference`, evaluate, score margins), `run` (`run_compare`: which cells run, where,
and the results files), `stats` (means, spreads, paired NaPO-vs-DPO intervals), `report` (markdown, CSV, plots).
"""

from napo.compare.cell import margin_summary, noisy_pairs, pair_margins, q_trajectory, run_cell
from napo.compare.grid import (
    DEFAULT_NOISE_RATES,
    DEFAULT_OBJECTIVES,
    DEFAULT_SEEDS,
    NOISE_KINDS,
    SMOOTHING_RANGE,
    CompareConfig,
    cell_key,
    label_smoothing_for,
    load_recipe,
    objective_grammar,
    objective_settings,
)
from napo.compare.report import KEY_METRICS, VERDICT_METRICS, write_report
from napo.compare.run import read_results, run_compare
from napo.compare.stats import (
    CLAIM_RULE,
    LOWER_IS_BETTER,
    cell_values,
    claim_verdict,
    clean_pair_check,
    gains_over_sft,
    paired_differences,
    summarize,
    t_quantile_975,
)
from napo.lab.tasks import CLEAN_PAIR_RULE

__all__ = [
    "CLAIM_RULE",
    "CLEAN_PAIR_RULE",
    "DEFAULT_NOISE_RATES",
    "DEFAULT_OBJECTIVES",
    "DEFAULT_SEEDS",
    "KEY_METRICS",
    "LOWER_IS_BETTER",
    "NOISE_KINDS",
    "SMOOTHING_RANGE",
    "VERDICT_METRICS",
    "CompareConfig",
    "cell_key",
    "cell_values",
    "claim_verdict",
    "clean_pair_check",
    "gains_over_sft",
    "label_smoothing_for",
    "load_recipe",
    "margin_summary",
    "noisy_pairs",
    "objective_grammar",
    "objective_settings",
    "pair_margins",
    "paired_differences",
    "q_trajectory",
    "read_results",
    "run_cell",
    "run_compare",
    "summarize",
    "t_quantile_975",
    "write_report",
]
