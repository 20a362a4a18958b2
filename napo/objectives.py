"""Preference objectives as pure functions of the reward margin.

Every objective here maps the per-pair margin

    z = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]      shape (n_pairs,)

to a per-pair loss of the same shape. The trainer computes z once (for each negative type) and looks the
objective up in `OBJECTIVES`; nothing here knows about models, batches or trainers.

Each objective also owns its settings and its batch statistics: NaPO's adaptive q (`napo_q`, from `adaptive_q`),
the weights γ of the negative types (`type_weights`, from `dynamic_weights`), TRL's reward statistics
(`reward_statistics`), their validation (`check_objective_settings`). Under data parallelism they take
`reduce_sum`, a function that sums a tensor over the processes (the trainer passes its accelerator's); the default
is one process.

All functions compute in float32 whatever the input dtype (bf16 margins lose too much in `expm1` / `log`)
and return the loss in the input's dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Below this q, (1 − σ(z)^q)/q is replaced by its limit −log σ(z): the two differ by O(q·log²σ(z)), far below
# float32 resolution, and it avoids dividing by q = 0.
_Q_EXACT_BCE = 1e-8


def _as_float32(z: Tensor) -> Tensor:
    return z.float() if z.dtype != torch.float64 else z


def napo_loss(margins: Tensor, q: float | Tensor) -> Tensor:
    """NaPO: the negative Box-Cox transform of σ(z), a noise-robust generalisation of DPO.

    Paper: "Debiasing Multimodal Large Language Models via Noise-Aware Preference Optimization" (CVPR 2025).
    "q → 0 behaves like the cross-entropy of DPO (fast, but fits noisy labels); q = 1 like the mean absolute
    error (robust to flipped labels)."

        L_q(z) = (1 − σ(z)^q) / q = −expm1(q · log σ(z)) / q          q ∈ (0, 1]
        dL/dz  = −σ(z)^q · (1 − σ(z))

    Computed in log space: `log σ` and `expm1` stay finite and accurate for z in [−1e4, 1e4] (the direct
    `(1 - sigmoid(z)**q)/q` loses all precision for σ(z) ≈ 1 and gives NaN gradients for very negative z).

    Args:
        margins: z, the β-scaled reward margins. Shape (n_pairs,).
        q: robustness coefficient, a float or a tensor broadcastable to `margins` (per pair or per type).
           q ≤ 1e-8 gives exactly DPO's −log σ(z); typical values 0.1–1.

    Returns:
        Per-pair loss, shape (n_pairs,), dtype of `margins`.
    """
    z = _as_float32(margins)
    q = torch.as_tensor(q, dtype=z.dtype, device=z.device)
    log_sigmoid = F.logsigmoid(z)
    # The unused branch of `where` still gets a gradient: keep its q away from zero so it is never 0/0.
    q_safe = q.clamp(min=_Q_EXACT_BCE)
    box_cox = -torch.expm1(q_safe * log_sigmoid) / q_safe
    loss = torch.where(q <= _Q_EXACT_BCE, -log_sigmoid, box_cox)
    return loss.to(margins.dtype)


def dpo_loss(margins: Tensor) -> Tensor:
    """DPO: the Bradley-Terry cross-entropy on the implicit reward margin.

    Paper: https://arxiv.org/abs/2305.18290. "Your language model is secretly a reward model."

        L(z) = −log σ(z)

    Args:
        margins: z, shape (n_pairs,).
    Returns:
        Per-pair loss, shape (n_pairs,).
    """
    return (-F.logsigmoid(_as_float32(margins))).to(margins.dtype)


def cdpo_loss(margins: Tensor, label_smoothing: float) -> Tensor:
    """cDPO: DPO with conservative label smoothing, for labels flipped with probability ε.

    Note: https://ericmitchell.ai/cdpo.pdf. "Assume the preference label is wrong with probability ε."

        L(z) = (1 − ε) · (−log σ(z)) + ε · (−log σ(−z))

    Args:
        margins: z, shape (n_pairs,).
        label_smoothing: ε in [0, 0.5); 0 gives DPO. Typical 0.1–0.3.
    Returns:
        Per-pair loss, shape (n_pairs,).
    """
    z = _as_float32(margins)
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(z) + eps * -F.logsigmoid(-z)).to(margins.dtype)


def rdpo_loss(margins: Tensor, label_smoothing: float) -> Tensor:
    """rDPO: the unbiased estimator of the clean DPO loss under label flips with known rate ε.

    Paper: Chowdhury et al. 2024, "Provably Robust DPO" (https://arxiv.org/abs/2403.00409).
    "De-bias the noisy loss so that its expectation under flips equals the clean loss."

        L(z) = [(1 − ε) · (−log σ(z)) − ε · (−log σ(−z))] / (1 − 2ε)

    Args:
        margins: z, shape (n_pairs,).
        label_smoothing: the flip rate ε in [0, 0.5); 0 gives DPO.
    Returns:
        Per-pair loss, shape (n_pairs,). Unlike DPO it can be negative.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"rdpo needs label_smoothing in [0, 0.5), got {label_smoothing}")
    z = _as_float32(margins)
    eps = label_smoothing
    loss = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return loss.to(margins.dtype)


def ipo_loss(margins: Tensor, beta: float) -> Tensor:
    """IPO: regress the log-ratio difference onto a fixed target instead of pushing it to infinity.

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (https://arxiv.org/abs/2310.12036), Eq. 17. "IPO avoids the over-fitting of DPO on deterministic preferences."

        h = z / β   (the un-scaled log-ratio difference);   L = (h − 1/(2β))²

    The margins here use summed sequence log-probs (TRL's `ipo` averages them per token first).

    Args:
        margins: z, shape (n_pairs,).
        beta: β > 0, the same β that scaled the margins (τ in the paper).
    Returns:
        Per-pair loss, shape (n_pairs,).
    """
    h = _as_float32(margins) / beta
    return ((h - 1 / (2 * beta)) ** 2).to(margins.dtype)


def hinge_loss(margins: Tensor) -> Tensor:
    """Hinge (SLiC-HF): a margin loss that stops pushing once the margin exceeds 1.

    Paper: Zhao et al. 2023, "SLiC-HF" (https://arxiv.org/abs/2305.10425).

        L(z) = max(0, 1 − z)

    Args:
        margins: z, shape (n_pairs,).
    Returns:
        Per-pair loss, shape (n_pairs,).
    """
    return torch.relu(1 - _as_float32(margins)).to(margins.dtype)


def sft_loss(margins: Tensor) -> Tensor:
    """No preference term: with `NaPOConfig.sft_weight` λ > 0 the whole loss is λ · the mean over rows of the summed
    NLL of the chosen answers — continued SFT on the pairs' chosen answers, the control that tells what a preference
    term adds beyond that NLL. TRL's `loss_type="sft"` (which averages the NLL per token instead).

        L(z) = 0 · z   (kept on the graph: the margins, rewards and weights are still computed and logged)

    Args:
        margins: z, shape (n_pairs,).
    Returns:
        Zeros, shape (n_pairs,).
    """
    return margins * 0.0


OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "napo": napo_loss,
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "rdpo": rdpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "sft": sft_loss,
}


def objective_loss(name: str, margins: Tensor, **available: float | Tensor) -> Tensor:
    """Look `name` up in `OBJECTIVES` and call it with the hyper-parameters it declares.

    `available` holds every hyper-parameter the caller knows (q, beta, label_smoothing); each objective takes
    only the ones in its signature, so adding an objective never touches the trainer.
    """
    try:
        fn = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}") from None
    wanted = [p for p in inspect.signature(fn).parameters if p != "margins"]
    return fn(margins, **{p: available[p] for p in wanted})


# q_min of each adaptive-q variant when none is given: the paper clips at 0.01, the released code at 0.001.
Q_MIN_DEFAULTS: dict[str, float] = {"paper": 0.01, "official": 0.001}


def adaptive_q(psi: Tensor, alpha: float, variant: str = "paper", q_min: float | None = None) -> Tensor:
    """NaPO's robustness coefficient q, adapted from the batch's mean reward margin ψ; never back-propagated.

    While the margins of a negative type are small or negative, the model disagrees with many of its labels,
    which is where flipped labels hide: q is large (towards MAE, robust). As the model separates the pairs and
    ψ grows, q falls towards 0 (towards DPO's fast cross-entropy).

        paper (Eq. 12):  q = clip(1 − σ(α·ψ),      q_min, 1)    q_min = 0.01,  ψ = mean of β·(Δ_w − Δ_l)
        official:        q = clip(2 · (1 − σ(α·ψ)), q_min, 1)    q_min = 0.001, ψ = mean of (Δ_w − Δ_l), no β

    Δ = log π(y|x) − log π_ref(y|x), summed over the completion or averaged per token (the caller chooses; see
    `NaPOConfig.margin_*`). The paper (arXiv 2503.17928): Eq. 12 q = 1 − σ(α·ψ) with ψ Eq. 2's margin, ψ_μ =
    β·(Δ_w/|y_w| − Δ_l/|y_l|) for language-biased negatives (α 0.5) and ψ_Σ = β·(Δ_w − Δ_l) for vision-biased ones
    (α 0.01), "the batch-average reward margin"; §4.1 truncates q to [0.01, 1]. "official" transcribes the
    authors' released code (zhangzef/NaPO, `muffin/data/bias_datasets_trainer.py`,
    `LLaVA15BiasPOTrainer.dpo_lq_dyn_loss`): there ψ is the raw log-ratio difference without β, averaged over
    processes under `no_grad`. Which ψ goes in is the caller's business; this function only maps ψ to q.

    Args:
        psi: ψ, the mean margin of one negative type (a scalar tensor, or any shape: computed elementwise).
             A NaN ψ is read as 0 (no evidence either way) so q always stays in [q_min, 1].
        alpha: α > 0, the margin scale; the paper uses 0.5 with length-averaged margins and 0.01 with summed ones.
        variant: "paper" or "official".
        q_min: lower bound of q, in (0, 1]; None takes the variant's (`Q_MIN_DEFAULTS`: 0.01 / 0.001).

    Returns:
        q, same shape as `psi`, float32, detached, in [q_min, 1].
    """
    scale = {"paper": 1.0, "official": 2.0}.get(variant)
    if scale is None:
        raise ValueError(f"unknown adaptive q variant {variant!r}; valid: 'paper', 'official'")
    q_min = Q_MIN_DEFAULTS[variant] if q_min is None else q_min
    if not 0.0 < q_min <= 1.0:
        raise ValueError(f"q_min must be in (0, 1], got {q_min}")
    psi = torch.nan_to_num(torch.as_tensor(psi).detach().float(), nan=0.0)
    q = scale * torch.sigmoid(-alpha * psi)  # 1 − σ(x) = σ(−x), exact also where σ(x) rounds to 1
    return q.clamp(min=q_min, max=1.0)


# Σ_j ψ_Σ,j at or below which the dynamic weights are equal (see `dynamic_weights`): above float32 rounding noise of
# β-scaled margins between two equal policies, far below any margin training produces after its first update.
PSI_SUM_FLOOR = 1e-6


def dynamic_weights(psi_sums: Tensor, gamma_min: float = 0.01) -> Tensor:
    """NaPO's dynamic weights γ of the negative types (Eq. 13, truncated as §4.1 says), from each type's batch
    margin; never back-propagated.

    A type whose pairs the model already separates well (large margin) is trusted more; a type the model
    disagrees with (small or negative margin, where noisy "negatives" that are as good as chosen sit) gets less
    weight, down to γ_min:

        ψ_Σ,i = mean over the batch's pairs of type i of β·(Δ_w − Δ_l,i),  Δ summed over completion tokens
        γ_i   = clip(ψ_Σ,i / Σ_j ψ_Σ,j, γ_min, 1)

    The paper (arXiv 2503.17928): Eq. 13 γ_i = ψ_Σ(x, y_w, y_i) / Σ_i ψ_Σ(x, y_w, y_i) over i ∈ {y_l, y_lb, y_vb},
    ψ_Σ Eq. 2's summed-logP β-margin; Eq. 14 the objective L_γ = γ_l·L_DPO + γ_lb·L_NaPO + γ_vb·L_NaPO; §4.1 "both
    q and the dynamic loss weight[s] are truncated to the range [0.01, 1]". Eq. 13 is written per pair; its margins
    are the batch means here, as for the paper's q ("the batch-average reward margin", for stability) and as in
    the released code (`LLaVA15BiasPOTrainer.compute_loss`, `loss_weight == "dyn"`, commented out there: the
    released runs use fixed 0.02/0.49/0.49), whose γ_i = max(ψ_Σ,i / Σ_j ψ_Σ,j, 0.01) has no upper bound and
    takes ψ_Σ,i as the mean over the processes of their mean of `chosen_rewards − rejected_rewards_i` (napo: the
    mean over all pairs of all processes; equal when each process holds as many pairs of the type).
    Where the formula is undefined, napo (neither the paper nor the code) gives equal weights 1/n: Σ_j ψ_Σ,j ≤ 1e-6
    (at step 0 every margin is 0, policy = reference). The upper clip matters where a negative ψ_Σ,j pushes the
    others' ratios above 1: no step is scaled up. The weights are not renormalised after clipping (nor in the
    code). The 1e-6 (nats, β-scaled) floor: γ is a ratio of margins, so at step 0 the rounding noise of two equal
    policies (~1e-8 in float32, e.g. a reference precomputed on batches padded otherwise, or `share_prompt`) would
    otherwise decide the weights.

    Args:
        psi_sums: ψ_Σ, one per negative type present in the batch, shape (n_types,). Non-finite entries read as 0.
        gamma_min: γ_min, the truncation floor, in [0, 1]; the paper and the code use 0.01.

    Returns:
        γ, shape (n_types,), float32, detached, each in [γ_min, 1] (or 1/n each when Σψ_Σ ≤ 1e-6).
    """
    if not 0.0 <= gamma_min <= 1.0:
        raise ValueError(f"gamma_min must be in [0, 1], got {gamma_min}")
    psi = torch.as_tensor(psi_sums).detach().float()
    if psi.ndim != 1 or psi.numel() == 0:
        raise ValueError(f"psi_sums must have shape (n_types,) with n_types >= 1, got {tuple(psi.shape)}")
    psi = torch.nan_to_num(psi, nan=0.0, posinf=0.0, neginf=0.0)
    total = psi.sum()
    if not total > PSI_SUM_FLOOR:
        return torch.full_like(psi, 1.0 / psi.numel())
    return (psi / total).clamp(min=gamma_min, max=1.0)


# ------------------------------------------------------------------------------------------ settings
# Objectives that read `label_smoothing` as the flip rate ε.
LABEL_SMOOTHING_OBJECTIVES = ("cdpo", "rdpo")
# How the weights γ of the negative types are set (`type_weights`).
WEIGHT_MODES = ("dynamic", "fixed")


def parse_q(q: str | float) -> str | float:
    """NaPO's q setting: an adaptive variant ('paper', 'official') or a fixed number in (0, 1] (also as a string)."""
    if q in Q_MIN_DEFAULTS:
        return q
    try:
        value = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q must be 'paper', 'official' or a number in (0, 1], got {q!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"a fixed q must be in (0, 1], got {value}")
    return value


def check_objective_settings(
    objective: str, *, q: str | float, q_min: float | None, weights: str, weight_min: float, label_smoothing: float
) -> str | float:
    """Raise ValueError for an objective name or an objective setting out of range; return `q` parsed (`parse_q`).

    The settings are `NaPOConfig`'s: NaPO's `q` and `q_min`, the γ `weights` mode and its floor `weight_min`, and
    `label_smoothing`, the flip rate ε of cdpo/rdpo."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of: {', '.join(OBJECTIVES)}")
    q = parse_q(q)
    if q_min is not None and not 0.0 < q_min <= 1.0:
        raise ValueError(f"q_min must be in (0, 1], got {q_min}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be 'dynamic' or 'fixed', got {weights!r}")
    if not 0.0 <= weight_min <= 1.0:
        raise ValueError(f"weight_min must be in [0, 1], got {weight_min}")
    if objective in LABEL_SMOOTHING_OBJECTIVES and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{objective} needs label_smoothing (the flip rate ε) in [0, 0.5)")
    return q


# ------------------------------------------------------------------------------------------ batch statistics
# Sums a tensor over the data-parallel processes (elementwise), the same result on every process.
ReduceSum = Callable[[Tensor], Tensor]


def _one_process(values: Tensor) -> Tensor:
    return values


def mean_over_processes(values: Tensor, reduce_sum: ReduceSum = _one_process) -> Tensor:
    """Mean of `values` (any shape) over the elements of all processes, float32 scalar; NaN when no process has any.
    Identical on every process."""
    stats = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    total, count = reduce_sum(stats)
    return total / count


def mean_of_process_means(values: Tensor, reduce_sum: ReduceSum = _one_process) -> Tensor:
    """Mean over the processes that hold any of `values` of their local mean, float32 scalar (NaN when none does):
    the released NaPO code's `gather_and_do_mean`, which weighs a process with few pairs as one with many."""
    local = values.float()
    held = local.numel() > 0
    stats = torch.stack([local.mean() if held else local.new_zeros(()), local.new_tensor(float(held))])
    total, count = reduce_sum(stats)
    return total / count


def napo_q(
    q: str | float,
    summed: Tensor,
    per_token: Tensor,
    *,
    alpha: float,
    margin: str,
    beta: float,
    q_min: float | None = None,
    reduce_sum: ReduceSum = _one_process,
) -> Tensor:
    """q of one negative type for NaPO's loss: fixed, or adapted from ψ, its batch mean margin (detached).

        paper (Eq. 12):  ψ = mean over the pairs of all processes of β·(Δ_w − Δ_l)
        official:        ψ = mean over the processes of their mean of (Δ_w − Δ_l), no β (`mean_of_process_means`)

    then q = `adaptive_q(ψ, alpha, q, q_min)`.

    Args:
        q: 'paper', 'official' or a fixed number (`parse_q`).
        summed, per_token: the pairs' raw log-ratio differences Δ_w − Δ_l (no β), shape (n_pairs,) on this process
            (n_pairs may be 0), with Δ = log π − log π_ref summed over the completion tokens or averaged per token.
        alpha: α of the type; margin: 'sum' or 'mean', which of `summed` / `per_token` ψ is made of.
        beta: β; q_min: the floor of q (None: the variant's, `Q_MIN_DEFAULTS`).
        reduce_sum: sums over the processes (`ReduceSum`).

    Returns:
        q, a float32 scalar on `summed`'s device, in [q_min, 1], detached; identical on every process.
    """
    if not isinstance(q, str):
        return torch.tensor(q, device=summed.device)
    differences = (summed if margin == "sum" else per_token).detach()
    if q == "official":
        psi = mean_of_process_means(differences, reduce_sum)
    else:
        psi = mean_over_processes(beta * differences, reduce_sum)
    return adaptive_q(psi, alpha, q, q_min).to(summed.device)


def reward_statistics(
    chosen_logratios: Tensor, negative_logratios: Tensor, beta: float, reduce_sum: ReduceSum = _one_process
) -> dict[str, Tensor]:
    """TRL's reward statistics of one negative type's pairs, means over the pairs of all processes (detached):

        rewards/chosen = mean β·Δ_w    rewards/rejected = mean β·Δ_l
        rewards/margins = ψ_Σ = mean z, z = β·(Δ_w − Δ_l)    rewards/accuracies = mean 1[z > 0]

    `chosen_logratios`, `negative_logratios`: Δ_w, Δ_l of the pairs on this process, shape (n_pairs,). Returns float32
    scalars, identical on every process (NaN when no process has a pair); `rewards/margins` is the ψ_Σ of
    `type_weights`."""
    chosen_logratios, negative_logratios = chosen_logratios.detach(), negative_logratios.detach()
    z = beta * (chosen_logratios - negative_logratios)
    return {
        "rewards/chosen": mean_over_processes(beta * chosen_logratios, reduce_sum),
        "rewards/rejected": mean_over_processes(beta * negative_logratios, reduce_sum),
        "rewards/margins": mean_over_processes(z, reduce_sum),
        "rewards/accuracies": mean_over_processes((z > 0).float(), reduce_sum),
    }


def normalised_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """γ̂: the fixed weights of the negative types present, renormalised to sum to 1 (ValueError when they sum to 0)."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"the weights of the negative columns present ({', '.join(weights)}) sum to 0")
    return {name: weight / total for name, weight in weights.items()}


def type_weights(
    psi_sums: Mapping[str, Tensor], mode: str, fixed: Mapping[str, float], gamma_min: float = 0.01
) -> dict[str, float]:
    """γ of each negative type with pairs in the batch (the keys of `psi_sums`): `mode` 'fixed' takes `fixed[type]`
    (γ̂, `normalised_weights`); 'dynamic' `dynamic_weights` (Eq. 13–14) of the types' ψ_Σ (scalar tensors, the
    batch mean summed margins of `reward_statistics`) with floor `gamma_min` — identical on every process as ψ_Σ is."""
    if mode == "fixed":
        return {name: fixed[name] for name in psi_sums}
    gammas = dynamic_weights(torch.stack([psi.float().cpu() for psi in psi_sums.values()]), gamma_min)
    return dict(zip(psi_sums, gammas.tolist(), strict=True))
