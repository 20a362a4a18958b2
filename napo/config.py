"""`NaPOConfig`: `trl.DPOConfig` plus the objective, the per-negative-type weights and the adaptive q."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from napo.negatives import NEGATIVE_BY_COLUMN, NEGATIVES, negative_type
from napo.objectives import LABEL_SMOOTHING_OBJECTIVES, check_objective_settings, normalised_weights
from napo.trl_losses import LABEL_SMOOTHING_LOSS_TYPES, TRL_LOSS_TYPES

# Each negative column with the short name of its logged metrics ("" for `rejected`, whose metrics keep TRL's names);
# kept for the modules that read it, the records are in `napo.negatives`.
NEGATIVE_TYPES: dict[str, str] = {t.column: t.metric_prefix.rstrip("/") for t in NEGATIVES}
MARGIN_REDUCTIONS = ("sum", "mean")


@dataclass
class NaPOConfig(DPOConfig):
    r"""Configuration of [`NaPOTrainer`]: every `trl.DPOConfig` field, plus:

    The loss of a batch is Σ_t γ_t · mean_pairs L_t(z), over the negative types t (columns `rejected`,
    `rejected_language_bias`, `rejected_vision_bias`, `rejected_audio_bias`) that have pairs in the batch. With
    `weights="dynamic"` (default, the paper's Eq. 13–14) γ comes from each type's batch mean summed margin
    (`napo.dynamic_weights`); with `weights="fixed"` γ_t are the `weight_*` of the columns present renormalised to
    sum to 1 (a column the dataset lacks contributes nothing). Either way a dataset with only `rejected` and
    `objective="dpo"` trains exactly stock DPO (its one γ is 1). A row whose value in a column is None simply has
    no pair of that type.

    With `objective="napo"`, the bias types use the NaPO loss with their own adaptive q while the original
    `rejected` pair uses DPO, as in the paper; when `rejected` is the only negative column it uses NaPO too.

    TRL's `loss_type` (with `loss_weights` and `f_divergence_type`) is the loss of every pair trained with DPO: all
    pairs with `objective="dpo"`, the original `rejected` pair with `objective="napo"` beside bias columns. Left unset,
    `objective` is "dpo" when `loss_type` / `loss_weights` / `f_divergence_type` / `ld_alpha` / `use_weighting`
    are not TRL's defaults (a TRL user's config then trains stock TRL's loss) and "napo" otherwise. A `loss_type` that
    no pair would use is refused.

    Defaults that differ from `trl.DPOConfig`: `bf16` defaults to True only when CUDA is available (bf16
    autocast on CPU is several times slower than fp32).

    `use_weighting` (WPO) weighs every pair, of any objective, by w(chosen)·w(rejected) as TRL does.

    `ld_alpha` (LD-DPO) weighs the tokens past the shorter answer of each pair, for every objective, as TRL does.

    Inherited settings napo does not honour are refused here, naming them: `ld_alpha` with `padding_free` or
    `precompute_ref_log_probs`, `pad_to_multiple_of`, `sync_ref_model` with `precompute_ref_log_probs`,
    `label_smoothing` where no loss reads it.
    """

    objective: str | None = field(
        default=None,
        metadata={
            "help": "Preference objective: napo (noise-aware, adaptive q), dpo (TRL's `loss_type`, sigmoid by "
            "default), cdpo (label-smoothed DPO), rdpo (robust DPO, Chowdhury et al. 2024), ipo (napo's, on summed "
            "log-ratios), hinge, sft (no preference term: only the `sft_weight` NLL of chosen answers, a control). "
            "cdpo/rdpo read `label_smoothing` as the flip rate ε. Default: dpo when `loss_type`, `loss_weights`, "
            "`f_divergence_type`, `ld_alpha` or `use_weighting` is set to something other than TRL's default, napo "
            "otherwise."
        },
    )
    q: str = field(
        default="paper",
        metadata={
            "help": "NaPO robustness coefficient of each negative type, from ψ = its batch mean margin over all "
            "processes, detached: 'paper' (Eq. 12 with §4.1's truncation: q = clip(1 − σ(α·ψ), q_min, 1), ψ = mean "
            "of Eq. 2's β·(Δ_w − Δ_l)); "
            "'official' (the authors' released code: q = clamp(2·(1 − σ(α·ψ)), q_min, 1), ψ = mean of the raw "
            "log-ratio difference Δ_w − Δ_l without β, a mean of the processes' means); or a fixed number in (0, 1] "
            "(near 0 → DPO, 1 → MAE, most robust to flipped labels). Δ = log π − log π_ref, summed or per token as "
            "`margin_*` says."
        },
    )
    q_min: float | None = field(
        default=None,
        metadata={
            "help": "Lower bound of the adaptive q, in (0, 1]. Default: the variant's own, 0.01 for 'paper', 0.001 "
            "for 'official' (the released code)."
        },
    )
    weights: str = field(
        default="dynamic",
        metadata={
            "help": "γ, the weight of each negative type in the loss: 'dynamic' (the paper's Eq. 13, truncated to "
            "[0.01, 1] as its §4.1 says: γ_i = clip(ψ_Σ,i / Σ_j ψ_Σ,j, weight_min, 1), ψ_Σ,i = the batch mean of "
            "β·(Δ_w − Δ_l,i) with summed Δ, over the types with pairs in the batch, detached; equal weights while "
            "Σψ_Σ ≤ 1e-6, e.g. at step 0, which is napo's) or 'fixed' "
            "(the `weight_*` fields renormalised over the columns present; the released code's runs use fixed "
            "0.02/0.49/0.49, its dynamic branch is commented out). Logged as `weight`, `language_bias/weight`, ..."
        },
    )
    weight_min: float = field(
        default=0.01,
        metadata={"help": "γ_min, the floor of the dynamic weights (0.01 in the paper's §4.1 and the released code)."},
    )
    weight_rejected: float = field(
        default=NEGATIVE_BY_COLUMN["rejected"].weight,
        metadata={"help": "Fixed γ of the original `rejected` pair (weights='fixed'; the released code uses 0.02)."},
    )
    weight_language_bias: float = field(
        default=NEGATIVE_BY_COLUMN["rejected_language_bias"].weight,
        metadata={
            "help": "Fixed γ of `rejected_language_bias` (answer made without the image/audio; weights='fixed')."
        },
    )
    weight_vision_bias: float = field(
        default=NEGATIVE_BY_COLUMN["rejected_vision_bias"].weight,
        metadata={
            "help": "Fixed γ of `rejected_vision_bias` (answer from the image without the question; weights='fixed')."
        },
    )
    weight_audio_bias: float = field(
        default=NEGATIVE_BY_COLUMN["rejected_audio_bias"].weight,
        metadata={
            "help": "Fixed γ of `rejected_audio_bias` (answer from the audio without the question; weights='fixed')."
        },
    )
    alpha_rejected: float = field(
        default=NEGATIVE_BY_COLUMN["rejected"].alpha,
        metadata={"help": "α of the adaptive q for `rejected` (used only when NaPO applies to it)."},
    )
    alpha_language_bias: float = field(
        default=NEGATIVE_BY_COLUMN["rejected_language_bias"].alpha,
        metadata={"help": "α of the adaptive q for language-biased negatives (paper: 0.5 with 'mean')."},
    )
    alpha_vision_bias: float = field(
        default=NEGATIVE_BY_COLUMN["rejected_vision_bias"].alpha,
        metadata={"help": "α of the adaptive q for vision-biased negatives (paper: 0.01 with 'sum')."},
    )
    alpha_audio_bias: float = field(
        default=NEGATIVE_BY_COLUMN["rejected_audio_bias"].alpha,
        metadata={"help": "α of the adaptive q for audio-biased negatives (as vision-biased: 'sum')."},
    )
    margin_rejected: str = field(
        default=NEGATIVE_BY_COLUMN["rejected"].margin,
        metadata={"help": "Margin ψ feeding q for `rejected`: 'sum' or 'mean' (per token)."},
    )
    margin_language_bias: str = field(
        default=NEGATIVE_BY_COLUMN["rejected_language_bias"].margin,
        metadata={
            "help": "Margin ψ feeding q for language-biased negatives: 'mean' = Δ_w/|y_w| − Δ_l/|y_l|, log-ratios "
            "averaged per completion token (paper); 'sum' = Δ_w − Δ_l summed (z/β); multiplied by β under q='paper', "
            "raw under q='official'."
        },
    )
    margin_vision_bias: str = field(
        default=NEGATIVE_BY_COLUMN["rejected_vision_bias"].margin,
        metadata={"help": "Margin ψ feeding q for vision-biased negatives: 'sum' (paper) or 'mean'."},
    )
    margin_audio_bias: str = field(
        default=NEGATIVE_BY_COLUMN["rejected_audio_bias"].margin,
        metadata={"help": "Margin ψ feeding q for audio-biased negatives: 'sum' or 'mean'."},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ of an NLL term on the chosen answers, added to the loss of any objective: loss + λ · mean over "
            "the batch's rows of −log π(y_w), the answer's summed log-prob, as the released code's DPO trainer "
            "(`LLaVA15DPOTrainer`, env `SFT_weight`, 0 by default; its NaPO trainer has no such term)."
            " It keeps the chosen likelihood from falling while margins grow (DPO's likelihood "
            "displacement). TRL's loss_type 'sft' differs: a per-token mean, only on pairs trained with DPO."
        },
    )
    encode_images_once: bool = field(
        default=False,
        metadata={
            "help": "Image datasets: send each distinct image of a batch through the vision tower once instead of once "
            "per sequence (a row's chosen answer and its K negatives all carry the row's images): same loss and "
            "gradients, (K+1)x fewer vision-tower FLOPs (napo.fast.encode_images_once). Tested on LLaVA, Qwen2-VL and "
            "PaliGemma; Idefics3 (tiled images with a pixel mask) falls back to the plain path. Off by default: a "
            "family whose image features come in another layout is not covered by those tests."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack the chosen and negative sequences of a batch into one row of their real tokens, positions "
            "restarting at each sequence, instead of padding them to the longest (napo.fast.pack_sequences): same "
            "loss, no FLOP spent on padding. sdpa/eager attention get a block-diagonal mask; flash-attention reads the "
            "same positions for its variable-length kernels (CUDA, not run in the test suite); Qwen2-VL-family "
            "positions are packed too. Tested equal to the "
            "padded path on Llama/Qwen2 text, LLaVA, Qwen2-VL, Idefics3 and Qwen2-Audio; refused for PaliGemma "
            "(prefix-LM mask). Any model is checked on the first batch (two extra forwards without gradients): "
            "packed log-probs that differ from the padded ones stop the job. trl 1.16 disables its own flag of this "
            "name."
        },
    )
    share_prompt: bool = field(
        default=False,
        metadata={
            "help": "Score a row's chosen answer and its K negatives on one pass over their shared prompt: the prompt "
            "(image tokens and vision tower included) runs once per row with its key/value cache kept for the "
            "backward pass, then the 1 + K answers run on that cache (napo.shared_prompt). Same log-probs, loss and "
            "gradients as the padded path, checked on the first batch; (1 + K)x fewer prompt FLOPs. For 1-D rotary "
            "positions with a causal mask (LLaVA-style VLMs, Idefics3, text LMs); refused with Qwen2-VL-family "
            "positions, prefix-LM masks (PaliGemma), padding_free, gradient checkpointing, use_weighting, ld_alpha, "
            "MoE router losses and more than one process."
        },
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "What a batch with a NaN/inf log-probability, or an optimizer step with NaN/inf gradients, does: "
            "'stop' (default) raises an error naming its dataset rows before the model is updated; 'skip' logs the "
            "rows and skips the batch (zero loss) or the optimizer step (no weight update), counted in the "
            "`nonfinite/skipped` and `nonfinite/skipped_steps` metrics."
        },
    )

    saturation_warning_steps: int = field(
        default=10,
        metadata={
            "help": "Warn when every pair of a negative type has had a margin |z| beyond 15 (σ(z) is 0 or 1: no "
            "gradient left, e.g. at a huge β) for this many consecutive training batches; 0 turns the warning off."
        },
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = torch.cuda.is_available()
        super().__post_init__()
        self._check_trl_settings()
        self.q = check_objective_settings(
            self.objective,
            q=self.q,
            q_min=self.q_min,
            weights=self.weights,
            weight_min=self.weight_min,
            label_smoothing=self.label_smoothing,
        )
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.objective == "sft" and not self.sft_weight:
            raise ValueError("objective='sft' has no preference term: set sft_weight > 0 (the NLL it trains on)")
        if self.saturation_warning_steps < 0:
            raise ValueError(f"saturation_warning_steps must be >= 0, got {self.saturation_warning_steps}")
        for column in NEGATIVE_BY_COLUMN:
            weight, _, reduction = self.negative_type_settings(column)
            if weight < 0:
                raise ValueError(f"weight of {column} must be >= 0, got {weight}")
            if reduction not in MARGIN_REDUCTIONS:
                raise ValueError(f"margin reduction of {column} must be one of {MARGIN_REDUCTIONS}, got {reduction!r}")

    @property
    def uses_trl_loss(self) -> bool:
        """Whether `loss_type` / `loss_weights` / `f_divergence_type` differ from TRL's defaults (plain sigmoid DPO)."""
        return self.loss_type != ["sigmoid"] or self.loss_weights is not None or self.f_divergence_type != "reverse_kl"

    def _check_trl_settings(self) -> None:
        """Resolve `objective` from TRL's `loss_type` and refuse every inherited setting napo would otherwise ignore."""
        unknown = [t for t in self.loss_type if t not in TRL_LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type {unknown} is not one of TRL's: {', '.join(TRL_LOSS_TYPES)}")
        if self.objective is None:
            # A TRL config (any of TRL's loss settings changed) trains TRL's loss, not NaPO.
            trl_config = self.uses_trl_loss or self.ld_alpha is not None or self.use_weighting
            self.objective = "dpo" if trl_config else "napo"
        if self.uses_trl_loss and self.objective not in ("dpo", "napo"):
            raise ValueError(
                f"loss_type={self.loss_type} (loss_weights={self.loss_weights}, f_divergence_type="
                f"{self.f_divergence_type!r}) is TRL's loss for pairs trained with DPO, but objective="
                f"{self.objective!r} trains no pair with DPO: use objective='dpo' for TRL's loss, or leave loss_type, "
                "loss_weights and f_divergence_type at their defaults"
            )
        refused = {
            "ld_alpha": (
                self.ld_alpha is not None and (self.padding_free or self.precompute_ref_log_probs),
                "LD-DPO weighs each pair's tokens by the other answer's length, which napo computes on padded batches "
                "with a live reference only (not with padding_free or precompute_ref_log_probs)",
            ),
            "pad_to_multiple_of": (
                self.pad_to_multiple_of is not None,
                "napo's collators pad every batch to its longest sequence",
            ),
            "share_prompt": (
                self.share_prompt
                and (
                    self.padding_free
                    or self.gradient_checkpointing
                    or self.use_weighting
                    or self.ld_alpha is not None
                    or self.world_size > 1
                ),
                "shared-prompt scoring keeps the prompt's key/value cache between two forwards and returns summed "
                "log-probs only: it cannot be combined with padding_free, gradient_checkpointing (no cache), "
                "use_weighting / ld_alpha (per-token log-probs) or more than one process (two forwards per backward)",
            ),
            "sync_ref_model": (
                self.sync_ref_model and self.precompute_ref_log_probs,
                "a reference that is synchronised during training makes precomputed reference log-probs stale "
                "(precompute_ref_log_probs=True); TRL refuses the same combination",
            ),
        }
        for name, (is_set, why) in refused.items():
            if is_set:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by NaPOTrainer: {why}; unset it")
        reads_label_smoothing = self.objective in LABEL_SMOOTHING_OBJECTIVES or (
            self.objective in ("dpo", "napo") and any(t in LABEL_SMOOTHING_LOSS_TYPES for t in self.loss_type)
        )
        if self.label_smoothing and not reads_label_smoothing:
            raise ValueError(
                f"label_smoothing={self.label_smoothing} is read only by objective cdpo/rdpo or loss_type "
                f"{'/'.join(LABEL_SMOOTHING_LOSS_TYPES)}; objective={self.objective!r} with loss_type={self.loss_type} "
                "would ignore it: unset it or choose one of those"
            )

    def negative_type_settings(self, column: str) -> tuple[float, float, str]:
        """(γ weight, α, margin reduction) of a negative column such as `rejected_language_bias`: the fields
        `weight_<name>`, `alpha_<name>`, `margin_<name>` of its `napo.negatives` record."""
        name = negative_type(column).name
        fields = [f"{kind}_{name}" for kind in ("weight", "alpha", "margin")]
        missing = [f for f in fields if not hasattr(self, f)]
        if missing:
            raise TypeError(
                f"negative column {column!r} is registered in napo.negatives but {type(self).__name__} lacks its "
                f"fields {missing}: declare them beside weight_language_bias"
            )
        return tuple(getattr(self, f) for f in fields)

    def negative_type_plan(self, columns: tuple[str, ...]) -> tuple[dict[str, float], dict[str, str]]:
        """γ̂ (weights renormalised over the negative columns a dataset has) and the objective of each column; raises
        ValueError when TRL's loss settings would train no pair."""
        weights = normalised_weights({c: self.negative_type_settings(c)[0] for c in columns})
        has_bias_types = any(c != "rejected" for c in columns)
        objectives = {
            # The paper keeps DPO for the original pair and applies NaPO to the bias-type negatives.
            c: "dpo" if (self.objective == "napo" and c == "rejected" and has_bias_types) else self.objective
            for c in columns
        }
        if self.uses_trl_loss and "dpo" not in objectives.values():
            raise ValueError(
                f"loss_type={self.loss_type} (loss_weights={self.loss_weights}, f_divergence_type="
                f"{self.f_divergence_type!r}) is the loss of pairs trained with DPO, but with objective="
                f"{self.objective!r} and the negative columns {list(columns)} every pair is trained with NaPO: set "
                "objective='dpo' to train TRL's loss, or add bias columns (their pairs use NaPO, `rejected` uses "
                "loss_type)"
            )
        return weights, objectives
