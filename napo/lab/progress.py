"""What `napo lab` shows while it runs: one bar over the whole run (SFT, pairs, each preference run, each
evaluation) with its ETA, and under it the running stage's own bar (SFT steps, TRL's training steps) — never the
trainer's raw metric dicts, which go to the report instead.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers import ProgressCallback

# A stage's cost in "sequence passes" (one forward of one sequence through the model), so that the run bar's ETA
# weighs a 700-step SFT above a 40-row evaluation. A backward pass costs about two forwards; a row's chosen answer
# and negatives share one prompt pass (`share_prompt`). Rough, checked on the quick vision lab on 2 busy cores
# (SFT 138 s, pairs 4 s, a preference run 16 s, an evaluation 9 s: 90-130 passes a second for each): they only have
# to rank the stages' durations right. A task's `eval_passes` are its evaluation's passes per row of a split.
PASSES_PER_SFT_ROW = 3  # forward + backward
PASSES_PER_PAIR_SOURCE_ROW = 4  # two negatives generated, prompt + decoding each
PASSES_PER_PREFERENCE_ROW = 6  # chosen + negatives on a shared prompt, forward + backward


def stage_costs(settings: dict[str, Any], eval_passes: int) -> dict[str, float]:
    """Each stage's cost in sequence passes (see `PASSES_PER_*`) from a lab's settings: sft, pairs, one preference
    run, one evaluation (`eval_passes` generations and scorings per evaluation row)."""
    return {
        "sft": settings["sft_steps"] * settings["sft_batch_size"] * PASSES_PER_SFT_ROW,
        "pairs": (settings["n_pairs"] + settings["n_counterfactual_pairs"]) * PASSES_PER_PAIR_SOURCE_ROW,
        "preference": settings["pref_steps"] * settings["pref_batch_size"] * PASSES_PER_PREFERENCE_ROW,
        "evaluation": settings["n_eval"] * eval_passes,
    }


class StageBar:
    """A bar over a run's stages, weighted by cost, with the elapsed time and the ETA of the rest.

    The ETA is (cost left) / (cost done per second so far). A stage found in the cache costs nothing: it leaves the
    total instead of filling the bar, so it does not make the rest look faster than it is.

        bar = StageBar({"SFT": 100.0, "pairs": 10.0}, desc="[lab]")
        bar.begin("SFT"); ...; bar.end("SFT")      # or bar.end("SFT", cached=True)
    """

    def __init__(self, costs: dict[str, float], *, desc: str, enabled: bool = True) -> None:
        self.costs = dict(costs)
        self.total, self.done = float(sum(self.costs.values())), 0.0  # cost units; kept here too when disabled
        self.bar = tqdm(
            total=self.total,
            desc=desc,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining} {postfix}",
            smoothing=0,  # the average rate over the whole run: stages differ too much for a moving average
            disable=not enabled,
            dynamic_ncols=True,
        )

    def begin(self, stage: str) -> None:
        """Show `stage` as the one running."""
        self.bar.set_postfix_str(stage)

    def end(self, stage: str, *, cached: bool = False) -> None:
        """Mark `stage` done: its cost fills the bar, or leaves the total when it was `cached`."""
        if cached:
            self.total -= self.costs[stage]
            self.bar.total = self.total
            self.bar.refresh()
        else:
            self.done += self.costs[stage]
            self.bar.update(self.costs[stage])

    def write(self, line: str) -> None:
        """Print a line above the bars without breaking them."""
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


class TrainingBar(ProgressCallback):
    """transformers' progress bar for `trainer.train()` without its printing of every log as a raw dict: the
    bar shows the latest loss instead, labelled `desc`, and disappears when training ends. With `enabled` False it
    shows and prints nothing (it replaces transformers' `PrinterCallback` too, see `napo.training`)."""

    def __init__(self, desc: str, *, enabled: bool = True) -> None:
        super().__init__()
        self.desc, self.enabled = desc, enabled

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = 0
        if self.enabled and state.is_world_process_zero:
            self.training_bar = tqdm(
                total=state.max_steps, desc=self.desc, unit="step", leave=False, dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.enabled:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)
