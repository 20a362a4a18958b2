"""`NaPOTrainer`: `trl.DPOTrainer` with several negative types per row and napo's objectives.

A batch of B rows whose dataset has K negative columns becomes one forward pass over the sequences

    [prompt+chosen, prompt+negative_1, ..., prompt+negative_K]   for every row (missing negatives left out)

so the chosen answer is forwarded once per row, not once per negative as when the same rows are fed to
`DPOTrainer` as K separate pairs. For each negative type t the β-scaled margin z_t of its pairs is computed
once; the loss is Σ_t γ_t · mean(L_t(z_t)) with L_t looked up in `napo.objectives.OBJECTIVES`, γ_t dynamic
(Eq. 13, from the types' detached mean margins, truncated to [0.01, 1]) or fixed, and, for NaPO, q_t adapted from
the type's detached margins (averaged over all processes).

Reference log-probs come from a frozen copy of the model (full fine-tuning), from the model with its LoRA
adapter disabled (PEFT: no second model in memory), or are precomputed once before training and cached on disk
(`precompute_ref_log_probs=True`) — for text and vision datasets alike.

Relies on private parts of trl 1.16.0 and transformers 5.23.0 (pinned exactly in pyproject.toml), all behind
`napo.trl_seam.TRLSeam`: this module overrides no private method. How sequences are scored (padded, packed or
shared-prompt layouts, the reference policy, precomputed reference log-probs) lives in `napo.trainer_scoring`, the
trainer's base class; this module builds the trainer and computes the loss.
"""

from __future__ import annotations

import copy
import logging
import textwrap

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, ProcessorMixin
from transformers.trainer_utils import TrainOutput

from napo.collators import ROW_INDEX, _ref_column, preference_collator
from napo.config import NaPOConfig
from napo.encoding import MEDIA_COLUMNS, has_media, tokenize_text_dataset, with_row_index
from napo.fast import encode_images_once
from napo.negatives import negative_type
from napo.nonfinite import NonFiniteGradientGuard, stop_or_skip
from napo.objectives import (
    mean_over_processes,
    napo_q,
    objective_loss,
    reward_statistics,
    type_weights,
)
from napo.rows import prepare_preference_dataset, validate_preference_dataset
from napo.scoring import forward_kwargs
from napo.trainer_scoring import TrainerScoring
from napo.trl_losses import pair_logps, trl_sequence_pair_loss

logger = logging.getLogger(__name__)

# |z| beyond which σ(z) is within 3e-7 of 0 or 1: a σ-based loss (DPO, NaPO, cDPO, ...) has no gradient left there.
SATURATED_MARGIN = 15.0


# Rows of a stream checked before training (a stream cannot be read twice cheaply, and may not end).
STREAM_ROWS_CHECKED = 64


def _validate(dataset: Dataset | IterableDataset) -> list[str]:
    """`validate_preference_dataset` of a dataset, or of the first `STREAM_ROWS_CHECKED` rows of a stream."""
    if isinstance(dataset, IterableDataset):
        dataset = Dataset.from_list(list(dataset.take(STREAM_ROWS_CHECKED)))
    return validate_preference_dataset(dataset)


class NaPOTrainer(TrainerScoring):
    """Preference training with one negative column or several (`rejected`, `rejected_language_bias`,
    `rejected_vision_bias`, `rejected_audio_bias`) and any objective of `napo.objectives`.

    Arguments as `trl.DPOTrainer`; `args` is a `NaPOConfig`. Rows: `prompt` (string or messages), optional
    `images`, `chosen`, and the negative columns (strings; None where a row lacks that negative).
    Logged per negative type (prefix `language_bias/`, `vision_bias/`, `audio_bias/`; none for `rejected`):
    `q` (NaPO), `weight` (γ), `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`; and
    `nonfinite/skipped` (see `NaPOConfig.on_nonfinite`). Datasets get a `row_index` column (0-based position in the
    dataset passed in) so that errors and warnings name the rows they are about.
    """

    _tag_names = ["trl", "dpo", "napo"]
    _name = "NaPO"
    # TRL's model card cites `_paper` (it would otherwise inherit DPO's).
    _paper = {
        "title": "Debiasing Multimodal Large Language Models via Noise-Aware Preference Optimization",
        "id": "2503.17928",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhang2025napo,
                title        = {{Debiasing Multimodal Large Language Models via Noise-Aware Preference Optimization}},
                author       = {Zefeng Zhang and Hengzhu Tang and Jiawei Sheng and Zhenyu Zhang and Yiming Ren and
                                Zhenyang Li and Dawei Yin and Duohe Ma and Tingwen Liu},
                year         = 2025,
                booktitle    = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
                pages        = {9423--9433}
            }"""),  # noqa: E501 (the BibTeX booktitle is one line)
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: NaPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if args is None:
            args = NaPOConfig(output_dir="napo-output")
        if not isinstance(args, NaPOConfig):
            raise TypeError(f"args must be a NaPOConfig, got {type(args).__name__}")
        train_dataset, eval_dataset = self._checked_datasets(train_dataset, eval_dataset, processing_class)
        self._type_weights, self._type_objectives = args.negative_type_plan(self.negative_columns)
        if (
            ref_model is None
            and isinstance(model, PreTrainedModel)
            and peft_config is None
            and not is_peft_model(model)
        ):
            # TRL would rebuild the reference from the model's name, which fails for a model never saved. A frozen
            # copy is the reference; with precomputation it is dropped once the log-probs are cached.
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self._wire_training_state(args, default_collator=data_collator is None)
        # `TRLSeam` ran DPOTrainer.__init__ with precompute_ref_log_probs and padding_free off: napo does both itself.
        if args.precompute_ref_log_probs:
            self._precompute_references(args)

    # ------------------------------------------------------------------------------------------ set-up
    def _checked_datasets(
        self, train_dataset: Dataset | None, eval_dataset: Dataset | dict[str, Dataset] | None, processing_class
    ) -> tuple[Dataset, Dataset | dict[str, Dataset] | None]:
        """The training and evaluation datasets as the trainer uses them, checked: implicit prompts split off, every
        row validated (`napo.rows`), a `row_index` column added; sets `negative_columns` and `_on_the_fly` (rows with
        media, processed by the multimodal collator). Raises ValueError for a missing training set or media rows
        with a text tokenizer."""
        if train_dataset is None:
            # TRL's words first, so that code matching TRL's error still matches.
            raise ValueError(
                "`train_dataset` is required: pass the preference dataset to train on (prompt, chosen and one or more "
                "rejected columns)"
            )
        # TRL's implicit-prompt rows (no `prompt` column): the shared prefix of the answers is the prompt.
        train_dataset = prepare_preference_dataset(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: prepare_preference_dataset(d) for name, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare_preference_dataset(eval_dataset)
        self.negative_columns = tuple(_validate(train_dataset))
        train_dataset, eval_dataset = with_row_index(train_dataset), with_row_index(eval_dataset)
        # Image and audio rows are processed on the fly by the multimodal collator; TRL only knows about images.
        first_row = next(iter(train_dataset))
        self._on_the_fly = has_media(first_row)
        if self._on_the_fly and processing_class is not None and not isinstance(processing_class, ProcessorMixin):
            media = [k for k in MEDIA_COLUMNS if first_row.get(k) is not None]
            raise ValueError(
                f"the training rows carry {'/'.join(media)} but processing_class is a "
                f"{type(processing_class).__name__}, a text tokenizer: pass the model's processor (AutoProcessor) of "
                "a vision-/audio-language model, or drop the media columns. (TRL: The dataset appears to be "
                "vision-related (contains 'image' or 'images' keys), but the provided model does not seem to be a "
                "vision-language model. Please check your model and dataset.)"
            )
        for dataset in eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]:
            if dataset is not None:
                _validate(dataset)
        return train_dataset, eval_dataset

    def _wire_training_state(self, args: NaPOConfig, default_collator: bool) -> None:
        """After `DPOTrainer.__init__`: the non-finite gradient guard, the per-`train()` counters, napo's collator
        (unless the caller passed one) and, with `encode_images_once`, the vision towers' image cache."""
        self._gradient_guard = NonFiniteGradientGuard(
            args.on_nonfinite, lambda name, value: self.logged_metrics("train")[name].append(value)
        )
        self.add_callback(self._gradient_guard)
        if args.share_prompt and self.aux_loss_enabled:
            raise ValueError("share_prompt: MoE router losses need the padded forward; set share_prompt=False")
        # Training micro-batches of this `train()` call, and those skipped as non-finite (their loss 0 is not trained).
        self._batches_run = self._batches_skipped = 0
        self._saturated_batches = dict.fromkeys(self.negative_columns, 0)  # consecutive batches, per negative type
        self._packing_verified = self._shared_prompt_verified = False
        if default_collator:
            self.data_collator = self._default_collator()
        if args.encode_images_once and self.is_vision_dataset:
            # Before precomputing: the reference pass gains as much as training does.
            for module in (self.model, self.ref_model):
                if module is not None:
                    encode_images_once(module)

    def _precompute_references(self, args: NaPOConfig) -> None:
        """`precompute_ref_log_probs`: every split's reference log-probs added as columns (`precompute_reference`);
        the frozen reference copy is then freed (a PEFT model keeps its adapter-disabled reference)."""
        train_batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
        eval_batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
        self.train_dataset = self.precompute_reference(self.train_dataset, "train", train_batch_size)
        if isinstance(self.eval_dataset, dict):  # dict and DatasetDict
            self.eval_dataset = {
                name: self.precompute_reference(d, name, eval_batch_size) for name, d in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self.precompute_reference(self.eval_dataset, "eval", eval_batch_size)
        if not is_peft_model(self.model):
            self.ref_model = None  # every split's reference log-probs are cached: free the copy

    def _default_collator(self):
        return preference_collator(
            self.processing_class,
            self.negative_columns,
            multimodal=self._on_the_fly,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
        )

    def dataset_columns(self) -> list[str]:
        """The dataset columns batches keep (the others are removed before collation)."""
        answer_columns = ("chosen", *self.negative_columns)
        if self._on_the_fly:
            media = ["image", "images", "audios", "sampling_rate", "tools", "chat_template_kwargs"]
            columns = ["prompt", *media, *answer_columns]
        else:
            columns = ["prompt_ids", *(f"{c}_ids" for c in answer_columns)]
        return columns + [_ref_column(c) for c in answer_columns] + [ROW_INDEX]

    def tokenize_dataset(self, dataset, processing_class, args, dataset_name):
        """Tokenizes text rows into `prompt_ids`, `chosen_ids` and `<column>_ids` (empty where None).

        Same rules as TRL (`napo.encoding.tokenize_text_dataset`): standard (string) rows get the EOS token appended to
        every answer; for conversational rows the completion starts where the rendered prompt and prompt+answer
        diverge, and the row's `tools` and `chat_template_kwargs` go to the chat template. Rows whose prompt fills
        `max_length` are dropped, with a warning naming them.
        """
        if self._on_the_fly:
            return dataset
        return tokenize_text_dataset(
            dataset,
            processing_class,
            ("chosen", *self.negative_columns),
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            num_proc=args.dataset_num_proc,
            name=dataset_name,
        )

    # ------------------------------------------------------------------------------------------ loss
    def _reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over all processes (`napo.objectives.ReduceSum`)."""
        return self.accelerator.reduce(values, reduction="sum")

    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of `values` over all processes (NaN when no process has any); identical on every rank."""
        return mean_over_processes(values, self._reduce_sum)

    def preference_loss(self, model, inputs: dict, return_outputs: bool):
        """Σ_t γ_t · mean over the pairs of type t of L_t(z) for a collated batch (module docstring), and the metrics
        of each negative type (class docstring); with `return_outputs`, (loss, the model's outputs)."""
        mode = "train" if self.model.training else "eval"
        if mode == "train" and ROW_INDEX in inputs:
            self._gradient_guard.record_rows(inputs[ROW_INDEX])  # named if the step's gradients are not finite
        scoring = self._model_inputs(inputs)
        sum_per_sequence = scoring[2]
        outputs, logps, ref_logps, token_logps = self._sequence_logps(model, inputs, scoring)
        if mode == "train":
            self._batches_run += 1
        if self._nonfinite_batch(inputs, logps - ref_logps):
            self._batches_skipped += mode == "train"
            skipped = logps.new_zeros((), requires_grad=True)  # a leaf: backward reaches no weight, so no update
            return (skipped, outputs) if return_outputs else skipped
        sequence_weights = None
        if self.args.use_weighting:  # WPO (Eq. 2): w = exp(mean over the completion of log p − log Σ_v p_v²)
            lengths = inputs["completion_mask"][:, 1:].sum(dim=1).clamp(min=1)  # scored completion tokens, (N,)
            with torch.no_grad():
                sequence_weights = torch.exp(sum_per_sequence(outputs.log_probs - outputs.log_sum_sq_probs) / lengths)
        rows, types = inputs["sequence_row"], inputs["sequence_type"]
        is_chosen = types == 0
        chosen_of_row = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long, device=rows.device)
        chosen_of_row[rows[is_chosen]] = is_chosen.nonzero().squeeze(1)

        metrics = self.logged_metrics(mode)
        per_type = {}  # column -> (per-pair loss on this process or None, pairs on all processes, ψ_Σ)
        for kind, column in enumerate(self.negative_columns, start=1):
            negative = (types == kind).nonzero().squeeze(1)
            pairs_everywhere = self.accelerator.reduce(torch.tensor(float(negative.numel()), device=logps.device))
            if pairs_everywhere == 0:  # the same decision on every rank, so the collectives below stay matched
                continue
            chosen = chosen_of_row[rows[negative]]
            per_pair, psi_sum = self._type_loss(column, chosen, negative, (logps, ref_logps, token_logps), inputs)
            if per_pair is not None and sequence_weights is not None:  # a pair weighs w(chosen) · w(negative), as TRL
                per_pair = per_pair * sequence_weights[chosen] * sequence_weights[negative]
            per_type[column] = (per_pair, pairs_everywhere, psi_sum)
        loss = self._weighted_loss(per_type, logps.new_zeros(()), metrics)
        chosen_logps = logps[is_chosen]
        if self.args.sft_weight:  # NLL on each row's chosen answer, averaged over all processes' rows like the pairs
            rows_everywhere = self.accelerator.reduce(torch.tensor(float(chosen_logps.numel()), device=logps.device))
            loss = loss - self.args.sft_weight * chosen_logps.sum() / (rows_everywhere / self.accelerator.num_processes)
        metrics["logps/chosen"].append(float(self._global_mean(chosen_logps.detach())))
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            metrics["aux_loss"].append(float(self._global_mean(outputs.aux_loss.detach())))
        if return_outputs:
            with torch.no_grad():
                outputs = model(**forward_kwargs(inputs))
            return loss, outputs
        return loss

    def _type_loss(
        self, column: str, chosen: torch.Tensor, negative: torch.Tensor, sequence_logps: tuple, inputs: dict
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One negative type's per-pair loss L_t(z), shape (n_pairs,) (None when this process holds none of its
        pairs), and ψ_Σ, the mean β-scaled summed margin over all processes (for dynamic γ); logs the type's q (NaPO)
        and reward statistics. `chosen`, `negative`: the pairs' sequence indices, shape (n_pairs,); `sequence_logps`:
        (logps, ref_logps, token_logps) of `_sequence_logps`."""
        logps, ref_logps, token_logps = sequence_logps
        completion_mask = inputs["completion_mask"]
        lengths = completion_mask[:, 1:].sum(dim=1).clamp(min=1)
        policy_pair, ref_pair = pair_logps(
            chosen, negative, logps, ref_logps, token_logps, completion_mask[:, 1:], self.args.ld_alpha
        )
        chosen_logratios, negative_logratios = policy_pair[0] - ref_pair[0], policy_pair[1] - ref_pair[1]
        z = self.beta * (chosen_logratios - negative_logratios)  # (n_pairs,)
        metrics = self.logged_metrics("train" if self.model.training else "eval")
        prefix = negative_type(column).metric_prefix
        if self.model.training:
            self._watch_saturation(column, z)
        q = None
        if self._type_objectives[column] == "napo":
            # The pairs' raw log-ratio differences (no β), summed and per token: `_q` picks and scales one.
            q = self._q(
                column,
                chosen_logratios - negative_logratios,
                chosen_logratios / lengths[chosen] - negative_logratios / lengths[negative],
            )
            metrics[f"{prefix}q"].append(float(q))
        per_pair = None
        if negative.numel():
            if self._type_objectives[column] == "dpo" and self.args.uses_trl_loss:
                per_pair = trl_sequence_pair_loss(
                    self.args, chosen, negative, policy_pair, ref_pair, logps, completion_mask, beta=self.beta
                )
            else:
                per_pair = objective_loss(
                    self._type_objectives[column], z, q=q, beta=self.beta, label_smoothing=self.args.label_smoothing
                )
        statistics = reward_statistics(chosen_logratios, negative_logratios, self.beta, self._reduce_sum)
        for name, value in statistics.items():
            metrics[f"{prefix}{name}"].append(float(value))
        return per_pair, statistics["rewards/margins"]

    def _weighted_loss(self, per_type: dict, loss: torch.Tensor, metrics: dict) -> torch.Tensor:
        """`loss` + Σ_t γ_t · (sum of type t's per-pair losses on this process) / (its mean pair count per process);
        `per_type`: column -> (per-pair loss or None, pairs on all processes, ψ_Σ). Logs each type's γ."""
        psi_sums = {column: psi_sum for column, (_, _, psi_sum) in per_type.items()}
        weights = type_weights(psi_sums, self.args.weights, self._type_weights, self.args.weight_min)
        for column, (per_pair, pairs_everywhere, _) in per_type.items():
            metrics[f"{negative_type(column).metric_prefix}weight"].append(float(weights[column]))
            if per_pair is not None:
                # Sum over this process's pairs / the mean pair count per process: once DDP averages the gradients
                # over processes this is the mean over all pairs, however unevenly the processes hold them.
                pairs_per_process = pairs_everywhere / self.accelerator.num_processes
                loss = loss + weights[column] * per_pair.sum() / pairs_per_process
        return loss

    def _watch_saturation(self, column: str, z: torch.Tensor) -> None:
        """Warn once a negative type's margins z (shape (n_pairs,), this process's pairs) have all been beyond
        ±SATURATED_MARGIN, on every process, for `saturation_warning_steps` consecutive training batches: σ(z) is then
        0 or 1 to float precision and the type's loss and gradients are (near) 0, silently (e.g. at β = 1e6)."""
        steps = self.args.saturation_warning_steps
        if not steps:
            return
        unsaturated = self.accelerator.reduce((z.detach().abs() <= SATURATED_MARGIN).sum().float(), reduction="sum")
        self._saturated_batches[column] = 0 if unsaturated > 0 else self._saturated_batches[column] + 1
        if self._saturated_batches[column] == steps:
            logger.warning(
                f"{column}: margins saturated: every pair's margin z = β·(Δ_chosen − Δ_rejected) has been beyond "
                f"±{SATURATED_MARGIN:g} "
                f"for {steps} training batches (step {self.state.global_step}, β={self.beta}, this batch's mean "
                f"|z| {float(z.detach().abs().mean()):.3g}): σ(z) is 0 or 1 to float precision, so this negative "
                "type's loss gives (almost) no gradient. Lower beta (or the learning rate) if this is not intended."
            )

    def train(self, *args, **kwargs) -> TrainOutput:
        """`Trainer.train`, with `train_loss` the mean over the micro-batches actually trained: a batch skipped as
        non-finite (`on_nonfinite="skip"`) returns loss 0, which transformers would average in."""
        self._batches_run = self._batches_skipped = 0
        output = super().train(*args, **kwargs)
        return TrainOutput(output.global_step, output.metrics["train_loss"], output.metrics)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self._batches_skipped:  # see `train`; the same dict is returned by `train`
            trained = self._batches_run - self._batches_skipped
            logs["train_loss"] = logs["train_loss"] * self._batches_run / trained if trained else float("nan")
        super().log(logs, start_time)

    def _nonfinite_batch(self, inputs: dict, logratios: torch.Tensor) -> bool:
        """Whether to skip this batch because a sequence on some process has a NaN/inf log-ratio (policy or reference
        log-prob, shape (N,)). Every process takes the same decision, so their collectives stay matched. With
        `on_nonfinite="stop"` raises instead, before any weight is updated. Either way names this process's dataset
        rows. Logs `nonfinite/skipped`: the fraction of batches skipped in the logging window."""
        bad = ~torch.isfinite(logratios.detach())
        bad_everywhere = self.accelerator.reduce(bad.sum().float(), reduction="sum")
        self.logged_metrics("train" if self.model.training else "eval")["nonfinite/skipped"].append(
            float(bad_everywhere > 0)
        )
        if bad_everywhere == 0:
            return False
        batch_rows = inputs["sequence_row"][bad].unique()
        row_ids = inputs[ROW_INDEX][batch_rows] if ROW_INDEX in inputs else batch_rows
        where = f"dataset rows {row_ids.tolist()}" if bad.any() else "rows of another process"
        message = f"non-finite (NaN/inf) log-probabilities at step {self.state.global_step} in {where}"
        stop_or_skip(self.args.on_nonfinite, message, "batch")
        return True

    def record_grad_norm(self, model: torch.nn.Module, grad_norm: float | torch.Tensor | None) -> None:
        """Hand the step's gradient norm to the non-finite gradient guard (`napo.nonfinite.NonFiniteGradientGuard`)."""
        self._gradient_guard.norm_computed(model, grad_norm)

    def _q(self, column: str, summed: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
        """q of one negative type (`napo.objectives.napo_q` with this config's q, q_min and the type's α and margin,
        over all processes). `summed`, `per_token`: the pairs' Δ_w − Δ_l (no β), shape (n_pairs,)."""
        _, alpha, margin = self.args.negative_type_settings(column)
        return napo_q(
            self.args.q,
            summed,
            per_token,
            alpha=alpha,
            margin=margin,
            beta=self.beta,
            q_min=self.args.q_min,
            reduce_sum=self._reduce_sum,
        )
