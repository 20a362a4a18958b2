"""TRL's `loss_type` family as pure functions of a batch of pairs, so that `NaPOTrainer` honours `DPOConfig.loss_type`,
`loss_weights` and `f_divergence_type` exactly as stock `trl.DPOTrainer` does on a dataset with one `rejected` column.

trl 1.16 computes these losses inline in its private `_compute_loss` (one if-chain over `loss_type`); there is no
function to call. The formulas here follow that code term by term and are tested against stock TRL on the same batch
(tests/test_trl_compat.py); napo's own objectives (`napo.objectives`) stay functions of the margin z alone.

Inputs, for the n pairs of one negative type (shapes (n,)):

    chosen_logps, rejected_logps           log π(y_w|x), log π(y_l|x), summed over the completion tokens
    ref_chosen_logps, ref_rejected_logps   the same under π_ref; Δ_w, Δ_l = the log-ratios log π − log π_ref
    chosen_lengths, rejected_lengths   completion tokens of each sequence (≥ 1)

With `f_divergence_type` the log-ratios become scores f'(π/π_ref) (f-DPO): reverse_kl s = Δ; forward_kl s = 1 − e^(−Δ);
js_divergence s = log 2 + log σ(Δ); alpha_divergence s = (e^((α−1)Δ) − 1)/(α − 1). The pair margin is β·(s_w − s_l).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# Loss types that read `label_smoothing` (the others ignore it in TRL).
LABEL_SMOOTHING_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float = 0.5) -> Tensor:
    """f'(π/π_ref) of each sequence's log-ratio Δ (shape (n,)), as in trl 1.16: see the module docstring."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit α → 1 is the reverse KL
            return logratios
        t = (alpha - 1.0) * logratios
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(t.dtype, 80.0)  # exp stays representable
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def trl_pair_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """Per-pair loss of one TRL `loss_type` for n pairs. Shape (n,); its mean is TRL's loss for that type.

    long: one branch per TRL loss type, each its paper's equation in a line or two, read top to bottom as TRL's
    `_compute_loss` chain; a table of functions would scatter them.

    Args:
        loss_type: one of `TRL_LOSS_TYPES`.
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: shape (n,) (module docstring).
        beta: β (τ of IPO).
        chosen_lengths, rejected_lengths: completion token counts, shape (n,), used by `ipo` and `sigmoid_norm`.
        label_smoothing: ε of `robust`, `exo_pair`, `aot`, `aot_unpaired`.
        discopop_tau: τ of `discopop`.
        f_divergence_type, f_alpha_divergence_coef: the f-DPO scores (module docstring).
        chosen_nll: `sft` only: the mean negative log-likelihood per chosen completion token of the batch (a scalar),
            which TRL spreads over the pairs.
    """
    chosen_logratios, rejected_logratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (chosen_scores - rejected_scores)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":  # Eq. 17 of IPO with per-token averaged scores, as TRL (confirmed with the IPO authors)
        delta = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        delta = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
        return -F.logsigmoid(beta * delta)
    if loss_type == "exo_pair":  # EXO-pref (Eq. 16): KL between softmax(z) over the pair and [1 − ε, ε]
        eps_t = torch.tensor(eps, device=z.device)
        return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps_t)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - torch.log(eps_t)
        )
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":  # hard-probability SPPO: winner regressed to +1/(2β), loser to −1/(2β)
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot":  # sorted policy log-prob differences against the sorted reference ones
        delta = (
            torch.sort(chosen_logps - rejected_logps, dim=0).values
            - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
        )
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "aot_unpaired":
        delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    if loss_type == "discopop":  # Eq. 5 of DiscoPOP: logistic and exponential losses blended by σ(z/τ)
        modulation = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    if loss_type == "sft":
        if chosen_nll is None:
            raise ValueError("loss_type 'sft' needs chosen_nll")
        return chosen_nll.expand(chosen_logratios.shape)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(TRL_LOSS_TYPES)}")


def length_desensitized_logps(
    chosen: Tensor, negative: Tensor, token_logps: Tensor, scored: Tensor, ld_alpha: float
) -> tuple[Tensor, Tensor]:
    """LD-DPO's log-probs of the pairs (sequence `chosen[j]`, sequence `negative[j]`), as TRL's `ld_alpha`: the
    tokens past the shorter answer's length weighed by α,

        Σ_{t ≤ min(|y_w|, |y_l|)} log p_t + α · Σ_{t > min} log p_t

    a pair-dependent sum, so a chosen answer with K negatives has K of them.

    Args:
        chosen, negative: indices of the pairs' sequences, shape (n_pairs,).
        token_logps: per-token log-probs of the batch's N sequences, shape (N, L-1).
        scored: 1 where a token of `token_logps` is a completion token, shape (N, L-1).
        ld_alpha: α in [0, 1].

    Returns:
        (log π(y_w), log π(y_l)), each shape (n_pairs,).
    """
    position = scored.cumsum(dim=1)  # 1, 2, ... along each answer's scored tokens
    shared = torch.minimum(scored[chosen].sum(dim=1), scored[negative].sum(dim=1)).unsqueeze(1)  # (n_pairs, 1)

    def weighted(sequences: Tensor) -> Tensor:
        weights = torch.where(position[sequences] <= shared, 1.0, ld_alpha) * scored[sequences]
        return (token_logps[sequences] * weights).sum(dim=1)

    return weighted(chosen), weighted(negative)


def trl_config_loss(
    config,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """Σ_i loss_weights_i · `trl_pair_loss(loss_type_i, ...)` for the n pairs, shape (n,): the loss a `DPOConfig`
    (`config`: its `loss_type`, `loss_weights`, `label_smoothing`, `discopop_tau`, `f_divergence_type`,
    `f_alpha_divergence_coef`) asks for. Arguments as `trl_pair_loss`; `chosen_nll` only when `sft` is a loss type."""
    total = 0.0
    for loss_type, weight in zip(config.loss_type, config.loss_weights or [1.0] * len(config.loss_type), strict=True):
        total = total + weight * trl_pair_loss(
            loss_type,
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            label_smoothing=config.label_smoothing,
            discopop_tau=config.discopop_tau,
            f_divergence_type=config.f_divergence_type,
            f_alpha_divergence_coef=config.f_alpha_divergence_coef,
            chosen_nll=chosen_nll,
        )
    return total


def pair_logps(
    chosen: Tensor,
    negative: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    token_logps: tuple[Tensor, Tensor] | None,
    scored: Tensor,
    ld_alpha: float | None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((log π(y_w), log π(y_l)), (log π_ref(y_w), log π_ref(y_l))) of the pairs (sequence `chosen[j]`, sequence
    `negative[j]`), each shape (n_pairs,): the summed log-probs `logps`, `ref_logps` (N,), or with `ld_alpha`
    LD-DPO's (`length_desensitized_logps`) from `token_logps` (policy, reference), (N, L-1) each, whose completion
    tokens are the 1s of `scored` (N, L-1)."""
    if token_logps is None:
        return (logps[chosen], logps[negative]), (ref_logps[chosen], ref_logps[negative])
    policy, reference = token_logps
    return (
        length_desensitized_logps(chosen, negative, policy, scored, ld_alpha),
        length_desensitized_logps(chosen, negative, reference, scored, ld_alpha),
    )


def trl_sequence_pair_loss(
    config,
    chosen: Tensor,
    negative: Tensor,
    policy_pair: tuple[Tensor, Tensor],
    ref_pair: tuple[Tensor, Tensor],
    logps: Tensor,
    completion_mask: Tensor,
    *,
    beta: float,
) -> Tensor:
    """`trl_config_loss` of the pairs (sequence `chosen[j]`, sequence `negative[j]`) of a batch of N sequences, shape
    (n_pairs,). `policy_pair`, `ref_pair`: the pairs' (chosen, rejected) log-probs (`pair_logps`); `logps` (N,) the
    summed log-probs of the batch's sequences; `completion_mask` (N, L) their completion tokens: the lengths are
    TRL's ipo/sigmoid_norm normaliser, and for sft the chosen NLL is the mean over the scored (shifted) chosen tokens
    of the pairs."""
    completion_tokens = completion_mask.sum(dim=1)
    chosen_nll = None
    if "sft" in config.loss_type:
        rows = chosen.unique()
        scored_tokens = completion_mask[:, 1:].sum(dim=1).clamp(min=1)
        chosen_nll = -logps[rows].sum() / scored_tokens[rows].sum()
    return trl_config_loss(
        config,
        *policy_pair,
        *ref_pair,
        beta=beta,
        chosen_lengths=completion_tokens[chosen],
        rejected_lengths=completion_tokens[negative],
        chosen_nll=chosen_nll,
    )
