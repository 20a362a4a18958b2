"""How `NaPOTrainer` scores its sequences: the batch layout (padded, packed or shared-prompt, each fast layout checked
once against the padded one), the reference policy (frozen copy, adapter-disabled PEFT model, or precomputed), and
reference log-probs precomputed once and cached on disk.

`TrainerScoring` is the base of `NaPOTrainer` (split out of `napo/trainer.py`, which keeps construction and the loss);
it reads the attributes `NaPOTrainer.__init__` sets: `negative_columns`, `_packing_verified` and
`_shared_prompt_verified`, besides TRL's (`args`, `model`, `ref_model`, `data_collator`, `padding_free`,
`aux_loss_enabled`).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from napo.collators import _ref_column
from napo.models.families import rope_index_function
from napo.scoring import (
    ScoringInputs,
    answer_table,
    check_same_logps,
    packed_inputs,
    padded_inputs,
    sequence_logps,
    summed_logps,
)
from napo.scoring import token_logps as per_token_logps
from napo.trl_seam import TRLSeam, disable_gradient_checkpointing, hash_module, use_adapter


class TrainerScoring(TRLSeam):
    """Sequence log-probs of collated batches under the policy and the reference, for `NaPOTrainer`'s loss,
    its reference precomputation and `log_prob_table`."""

    # ------------------------------------------------------------------------------- reference log-probs
    def _reference_logps(self, inputs: dict, scoring: ScoringInputs, per_token: bool = False) -> torch.Tensor:
        """Summed completion log-probs of every sequence under the reference policy, shape (N,); with `per_token` the
        fused head's per-token log-probs, shape (B, L-1) (0 off the completion). `inputs` is the collated batch,
        `scoring` its padded or packed form (`_model_inputs`)."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_policy() as reference,
        ):
            if per_token:
                return per_token_logps(reference, *scoring[:2])
            return self._summed_logps(reference, inputs, scoring)

    def _summed_logps(self, model: torch.nn.Module, inputs: dict, scoring: ScoringInputs) -> torch.Tensor:
        """Summed completion log-probs (N,) of a collated batch under `model`: shared-prompt with `share_prompt`,
        else from `scoring`, the batch's padded or packed layout (`_model_inputs`)."""
        if self.args.share_prompt:
            return self._shared_prompt_logps(model, inputs)
        return summed_logps(model, scoring)

    @contextlib.contextmanager
    def _reference_policy(self):
        """The module that computes reference log-probs: the frozen reference model, or the policy with its
        adapters disabled (PEFT: the "ref" adapter when there is one), or — once precomputation freed the frozen
        copy — the policy itself, which is the reference only before the first update."""
        if self.ref_model is not None:
            yield self.ref_model
        elif is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = "ref" if "ref" in unwrapped.peft_config else None  # None: adapters disabled = base model
            with use_adapter(unwrapped, adapter_name=adapter):
                yield self.model
        else:
            # TRL's rule; after the first update TRL's `evaluate` refuses a new dataset before reaching here.
            if self.state.global_step > 0:
                raise ValueError(
                    "Cannot compute reference log-probs after training has started: precompute_ref_log_probs=True "
                    "freed the reference model; pass the dataset as eval_dataset at initialization, or ref_model"
                )
            yield self.model

    def _shared_prompt_logps(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """`napo.shared_prompt.shared_prompt_logps`, checked once against the padded layout (`check_same_logps`)."""
        logps = sequence_logps(model, inputs, shared_prompt=True)
        if not self._shared_prompt_verified:
            self._shared_prompt_verified = True
            check_same_logps(
                "share_prompt",
                model,
                lambda: sequence_logps(model, inputs, shared_prompt=True),
                lambda: sequence_logps(model, inputs),
            )
        return logps

    def precompute_reference(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Adds `ref_chosen_logps` and `ref_<column>_logps` (NaN where a row lacks the negative) to `dataset`.

        Computed once with the reference policy and cached under `<output_dir>/ref_logps/`, keyed by the dataset
        fingerprint, the reference weights and the columns, so a resumed or repeated run reads them back.
        Works for vision datasets too: the collator processes the images exactly as during training.
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                f"Dataset or set `precompute_ref_log_probs=False`. (The {name} dataset is a stream: its reference "
                "log-probs cannot be stored beside its rows.)"
            )
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        answer_columns = ("chosen", *self.negative_columns)
        reference = self.ref_model if self.ref_model is not None else self.model
        key = Hasher.hash((dataset._fingerprint, hash_module(reference), answer_columns, self.args.max_length))
        cache = os.path.join(self.args.output_dir, "ref_logps", f"{name}-{key}.npy")
        if os.path.exists(cache):
            table = np.load(cache)
        else:
            table = self.log_prob_table(dataset, batch_size, f"Reference log-probs for the {name} dataset")
            if self.is_world_process_zero():
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                np.save(cache + ".tmp.npy", table)
                os.replace(cache + ".tmp.npy", cache)  # atomic: a killed run never leaves a half-written cache
        for k, column in enumerate(answer_columns):
            dataset = dataset.add_column(_ref_column(column), table[:, k].tolist())
        return dataset

    def log_prob_table(
        self, dataset: Dataset, batch_size: int, description: str | None = None, of: str = "reference"
    ) -> np.ndarray:
        """Summed completion log-probs of every row's answers, without gradients: under the reference policy
        (`of="reference"`), under the policy (`"policy"`), or the policy's log-ratio to the reference,
        log π(y|x) − log π_ref(y|x) (`"logratio"`).

        Returns float32 (len(dataset), 1 + K): column 0 the chosen answer, column k the k-th negative column, NaN
        where a row lacks that negative. Batches go through the trainer's collator, as in training. `description`
        labels a progress bar (none when None).
        """
        if of not in ("reference", "policy", "logratio"):
            raise ValueError(f"of={of!r}: expected 'reference', 'policy' or 'logratio'")
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)

        def score(batch: dict) -> torch.Tensor:
            batch = self.prepare_batch(batch)
            scoring = self._model_inputs(batch)
            if of in ("policy", "logratio"):
                with torch.no_grad():
                    logps = self._summed_logps(self.model, batch, scoring)
            if of in ("reference", "logratio"):
                reference = self._reference_logps(batch, scoring)
                logps = logps - reference if of == "logratio" else reference
            return logps

        show = description is not None and self.is_world_process_zero() and not self.args.disable_tqdm
        batches = tqdm(loader, desc=description, disable=not show, leave=False)
        return answer_table(batches, score, len(dataset), 1 + len(self.negative_columns))

    # ------------------------------------------------------------------------------------------ loss
    def _model_inputs(self, inputs: dict) -> ScoringInputs:
        """The padded or, with `padding_free`, packed layout of a collated batch (`napo.scoring.padded_inputs`,
        `packed_inputs`); the first packed batch is checked against the padded one (`napo.scoring.check_same_logps`):
        a family whose forward ignores packed `position_ids` would otherwise let packed sequences attend to each
        other and train on wrong log-probs without any error."""
        if not self.padding_free:
            return padded_inputs(inputs)
        rope_index = rope_index_function(self.accelerator.unwrap_model(self.model))
        packed = packed_inputs(inputs, rope_index)
        if not self._packing_verified:
            check_same_logps(
                "padding_free",
                self.model,
                lambda: summed_logps(self.model, packed),
                lambda: summed_logps(self.model, padded_inputs(inputs)),
            )
            self._packing_verified = True
        return packed

    def _sequence_logps(self, model, inputs: dict, scoring: ScoringInputs):
        """(outputs, logps, ref_logps, token_logps) of a collated batch of N sequences: the policy's outputs (None with
        `share_prompt`), its and the reference's summed completion log-probs (N,) (`napo.scoring`; the reference's
        precomputed, from the batch, when there), and with `ld_alpha` the per-token log-probs (policy, reference),
        (N, L-1) each."""
        # MoE models return their router's load-balancing loss only when asked (VLM wrappers: only as a forward
        # argument); the reference forward is not asked.
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        model_kwargs, labels, sum_per_sequence = scoring
        if self.args.share_prompt:
            outputs, logps = None, self._shared_prompt_logps(model, inputs)
        else:
            outputs = model(**model_kwargs, **router, labels=labels, fused_lm_head=True)
            logps = sum_per_sequence(outputs.log_probs)  # (N,), summed over completion tokens
        token_logps = None  # LD-DPO: per-token log-probs (policy, reference), shape (N, L-1) each, padded path only
        if "ref_logps" in inputs:
            ref_logps = inputs["ref_logps"].to(logps.dtype)
        elif self.args.ld_alpha is not None:
            ref_token_logps = self._reference_logps(inputs, scoring, per_token=True)
            ref_logps = sum_per_sequence(ref_token_logps)
            scored = labels.size(1) - 1
            token_logps = (outputs.log_probs[:, -scored:], ref_token_logps[:, -scored:])
        else:
            ref_logps = self._reference_logps(inputs, scoring)
        return outputs, logps, ref_logps, token_logps
