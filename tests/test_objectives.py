"""The objectives against closed forms, finite differences and the extremes of the margin range."""

import math

import pytest
import torch

from napo import objectives
from napo.objectives import adaptive_q, dynamic_weights, napo_loss, objective_loss

Z = torch.tensor([-30.0, -5.0, -1.0, -0.1, 0.0, 0.3, 2.0, 8.0, 40.0], dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def test_napo_limits_are_dpo_and_mae():
    # q -> 0: (1 - s^q)/q -> -log s ; q = 1: 1 - s
    bce = torch.tensor([-math.log(sigmoid(z)) for z in Z.tolist()], dtype=torch.float64)
    mae = torch.tensor([1 - sigmoid(z) for z in Z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(napo_loss(Z, 0.0), bce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(napo_loss(Z, 1e-7), bce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(napo_loss(Z, 1.0), mae, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("q", [0.05, 0.3, 0.7, 1.0])
def test_napo_matches_box_cox_formula(q):
    # Direct formula in float64 where it is still accurate (moderate z).
    z = torch.linspace(-6, 6, 25, dtype=torch.float64)
    expected = (1 - torch.sigmoid(z) ** q) / q
    torch.testing.assert_close(napo_loss(z, q), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("q", [0.0, 1e-3, 0.2, 0.5, 1.0])
def test_napo_gradient_is_closed_form_and_matches_finite_differences(q):
    z = Z.clone().requires_grad_(True)
    napo_loss(z, q).sum().backward()
    s = torch.sigmoid(Z)
    torch.testing.assert_close(z.grad, -(s**q) * (1 - s), rtol=1e-8, atol=1e-12)
    z2 = torch.linspace(-4, 4, 9, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: napo_loss(t, q), (z2,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [0.0, 1e-6, 0.01, 0.5, 1.0])
def test_napo_finite_at_extreme_margins(dtype, q):
    z = torch.tensor([-1e4, -3e3, -100.0, -1.0, 0.0, 1.0, 100.0, 3e3, 1e4], dtype=dtype, requires_grad=True)
    loss = napo_loss(z, q)
    loss.sum().backward()
    assert loss.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    # The loss is a decreasing function of the margin and non-negative.
    assert (loss.float().diff() <= 1e-6).all() and (loss >= 0).all()
    # At z = -1e4 the loss is 1/q (MAE-like saturation) or ~1e4 (BCE).
    expected = 1e4 if q < 1e-8 + 1e-12 else 1 / q if q > 1e-3 else None
    if expected is not None:
        assert float(loss[0].detach()) == pytest.approx(expected, rel=1e-2)


def test_naive_formula_is_what_we_avoid():
    # The authors' direct formula: NaN gradient at very negative margins in float32. Ours stays finite.
    z = torch.tensor([-200.0], requires_grad=True)
    ((1 - torch.sigmoid(z) ** 0.3) / 0.3).sum().backward()
    assert not torch.isfinite(z.grad).all()
    z2 = torch.tensor([-200.0], requires_grad=True)
    napo_loss(z2, 0.3).sum().backward()
    assert torch.isfinite(z2.grad).all()


def test_napo_per_pair_q_tensor():
    z = torch.tensor([0.5, 0.5, -2.0])
    q = torch.tensor([0.0, 1.0, 0.5])
    expected = torch.stack([napo_loss(z[i : i + 1], float(q[i]))[0] for i in range(3)])
    torch.testing.assert_close(napo_loss(z, q), expected)


def test_baselines_closed_forms():
    z = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    ls = lambda x: math.log(sigmoid(x))  # noqa: E731
    eps, beta = 0.2, 0.1
    for i, zi in enumerate(z.tolist()):
        assert float(objectives.dpo_loss(z)[i]) == pytest.approx(-ls(zi))
        assert float(objectives.cdpo_loss(z, eps)[i]) == pytest.approx(-(1 - eps) * ls(zi) - eps * ls(-zi))
        assert float(objectives.rdpo_loss(z, eps)[i]) == pytest.approx(
            (-(1 - eps) * ls(zi) + eps * ls(-zi)) / (1 - 2 * eps)
        )
        assert float(objectives.ipo_loss(z, beta)[i]) == pytest.approx((zi / beta - 1 / (2 * beta)) ** 2)
        assert float(objectives.hinge_loss(z)[i]) == pytest.approx(max(0.0, 1 - zi))


def test_rdpo_is_unbiased_under_flips():
    # E over a flip with probability eps of rdpo(z_noisy) equals the clean DPO loss (Chowdhury et al., Lemma 3.1).
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    eps = 0.3
    expected_noisy = (1 - eps) * objectives.rdpo_loss(z, eps) + eps * objectives.rdpo_loss(-z, eps)
    torch.testing.assert_close(expected_noisy, objectives.dpo_loss(z))


def test_objective_loss_dispatches_on_signature():
    z = torch.tensor([0.3, -0.2])
    everything = {"q": 0.5, "beta": 0.1, "label_smoothing": 0.1}
    for name in objectives.OBJECTIVES:
        out = objective_loss(name, z, **everything)
        assert out.shape == z.shape
    torch.testing.assert_close(objective_loss("napo", z, **everything), napo_loss(z, 0.5))
    with pytest.raises(ValueError, match="valid: napo, dpo"):
        objective_loss("simpo", z, **everything)


def test_adaptive_q_formulas():
    psi = torch.tensor([-4.0, 0.0, 1.0, 30.0])
    alpha = 0.5
    paper = [min(1.0, max(0.01, 1 - sigmoid(alpha * p))) for p in psi.tolist()]
    official = [min(1.0, max(0.001, 2 * (1 - sigmoid(alpha * p)))) for p in psi.tolist()]
    torch.testing.assert_close(adaptive_q(psi, alpha), torch.tensor(paper))
    torch.testing.assert_close(adaptive_q(psi, alpha, "official"), torch.tensor(official))
    assert float(adaptive_q(torch.tensor(0.0), 0.5, "official")) == 1.0
    # Hand-computed: 1 − σ(0.5) = 0.377541, 2(1 − σ(1)) = 0.537883; ψ = 30 gives each variant's own floor.
    assert float(adaptive_q(torch.tensor(1.0), 0.5)) == pytest.approx(0.377541, abs=1e-6)
    assert float(adaptive_q(torch.tensor(2.0), 0.5, "official")) == pytest.approx(0.537883, abs=1e-6)
    assert float(adaptive_q(torch.tensor(30.0), 0.5)) == pytest.approx(0.01)
    assert float(adaptive_q(torch.tensor(30.0), 0.5, "official")) == pytest.approx(0.001)


def released_q(global_mean: float, alpha: float) -> torch.Tensor:
    """The released code's q (zhangzef/NaPO, muffin/data/bias_datasets_trainer.py, `dpo_lq_dyn_loss`), transcribed:
    `torch.clamp(2 * (1 - torch.sigmoid(torch.tensor(alpha * global_mean))), min=0.001, max=1.0)`."""
    return torch.clamp(2 * (1 - torch.sigmoid(torch.tensor(alpha * global_mean))), min=0.001, max=1.0)


@pytest.mark.parametrize("alpha", [0.5, 0.01])
def test_official_q_is_the_released_formula(alpha):
    for psi in [-300.0, -3.0, 0.0, 0.7, 2.0, 40.0, 900.0]:
        assert float(adaptive_q(torch.tensor(psi), alpha, "official")) == pytest.approx(
            float(released_q(psi, alpha)), abs=1e-6
        )


def released_dynamic_weights(margins: list[float]) -> list[float]:
    """The released code's commented-out dynamic branch (`loss_weight == "dyn"` in `LLaVA15BiasPOTrainer.compute_loss`),
    transcribed: `weight_sum = sum(loss_weight_list); [max(x / weight_sum, 0.01) for x in loss_weight_list]`."""
    weight_sum = sum(margins)
    return [max(x / weight_sum, 0.01) for x in margins]


def paper_dynamic_weights(margins: list[float]) -> list[float]:
    """The paper's Eq. 13, γ_i = ψ_Σ,i / Σ_j ψ_Σ,j, "truncated to the range [0.01, 1]" (§4.1)."""
    total = sum(margins)
    return [min(1.0, max(0.01, m / total)) for m in margins]


def test_dynamic_weights_hand_values():
    # ψ_Σ = (0.2, 1.0, 0.8): Σ = 2 → γ = (0.1, 0.5, 0.4).
    torch.testing.assert_close(dynamic_weights(torch.tensor([0.2, 1.0, 0.8])), torch.tensor([0.1, 0.5, 0.4]))
    # A type with a tiny margin is truncated at γ_min: (0.001, 5, 5) → (0.01, 0.4999, 0.4999).
    torch.testing.assert_close(
        dynamic_weights(torch.tensor([0.001, 5.0, 5.0])), torch.tensor([0.01, 5 / 10.001, 5 / 10.001])
    )
    torch.testing.assert_close(
        dynamic_weights(torch.tensor([0.001, 5.0, 5.0]), gamma_min=0.05), torch.tensor([0.05, 5 / 10.001, 5 / 10.001])
    )
    # One type: γ = 1 whatever its margin (so a `rejected`-only dataset trains plain DPO).
    for psi in (-2.0, 0.0, 3.0):
        assert dynamic_weights(torch.tensor([psi])).tolist() == [1.0]


def test_dynamic_weights_match_the_released_formula_where_it_is_defined():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        margins = (torch.rand(3, generator=generator) * 4).tolist()  # positive margins: the formula is well defined
        torch.testing.assert_close(
            dynamic_weights(torch.tensor(margins)), torch.tensor(released_dynamic_weights(margins))
        )


def test_dynamic_weights_follow_the_papers_truncation():
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        margins = (torch.rand(3, generator=generator) * 6 - 2).tolist()  # margins of either sign
        if sum(margins) <= 1e-3:
            continue
        torch.testing.assert_close(dynamic_weights(torch.tensor(margins)), torch.tensor(paper_dynamic_weights(margins)))


def test_dynamic_weights_where_the_formula_is_undefined():
    # Σψ = 0 (step 0: policy = reference) or < 0: equal weights instead of 0/0 or sign-flipped weights.
    torch.testing.assert_close(dynamic_weights(torch.zeros(3)), torch.full((3,), 1 / 3))
    # Rounding noise of two equal policies (float32, ~1e-8) does not decide the weights; a real margin does.
    torch.testing.assert_close(dynamic_weights(torch.tensor([3e-9, -1e-9, 5e-9])), torch.full((3,), 1 / 3))
    torch.testing.assert_close(dynamic_weights(torch.tensor([3e-6, 1e-6])), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(dynamic_weights(torch.tensor([-1.0, 0.5])), torch.full((2,), 0.5))
    # A negative margin pushes the other ratio above 1 (3/2 = 1.5): clipped at 1 (the paper's truncation, not the
    # code's), the negative one at γ_min.
    torch.testing.assert_close(dynamic_weights(torch.tensor([3.0, -1.0])), torch.tensor([1.0, 0.01]))
    weights = dynamic_weights(torch.tensor([float("nan"), 1.0, float("inf")]))
    torch.testing.assert_close(weights, torch.tensor([0.01, 1.0, 0.01]))
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not dynamic_weights(leaf * 2).requires_grad


def test_dynamic_weights_reject_bad_arguments():
    with pytest.raises(ValueError, match="gamma_min"):
        dynamic_weights(torch.tensor([1.0]), gamma_min=1.5)
    with pytest.raises(ValueError, match="n_types"):
        dynamic_weights(torch.tensor([]))
    with pytest.raises(ValueError, match="n_types"):
        dynamic_weights(torch.ones(2, 2))


def test_adaptive_q_stays_in_range_and_is_detached():
    psi = torch.tensor([float("-inf"), -1e30, float("nan"), 1e30, float("inf")], requires_grad=False)
    for variant in ("paper", "official"):
        q = adaptive_q(psi, 0.5, variant, q_min=0.05)
        assert torch.isfinite(q).all() and (q >= 0.05).all() and (q <= 1.0).all()
    leaf = torch.tensor(1.0, requires_grad=True)
    assert not adaptive_q(leaf * 2, 0.5).requires_grad


def test_adaptive_q_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        adaptive_q(torch.tensor(0.0), 0.5, "median")
    with pytest.raises(ValueError, match="q_min"):
        adaptive_q(torch.tensor(0.0), 0.5, q_min=0.0)


def two_process_reduce(other: torch.Tensor, kind: str):
    """`reduce_sum` of a simulated second process that holds `other`: it adds (Σ, n) or (mean, held) of `other`."""

    def reduce_sum(stats: torch.Tensor) -> torch.Tensor:
        if kind == "pooled":
            contribution = [float(other.sum()), float(other.numel())]
        else:
            contribution = [float(other.mean()) if other.numel() else 0.0, float(other.numel() > 0)]
        return stats + stats.new_tensor(contribution)

    return reduce_sum


def test_napo_q_paper_pools_pairs_and_official_averages_process_means():
    # This process: Δ_w − Δ_l = (1, 3); the other: (10,). β = 0.1, α = 0.5.
    mine, theirs = torch.tensor([1.0, 3.0]), torch.tensor([10.0])
    paper = objectives.napo_q(
        "paper",
        mine,
        mine / 2,
        alpha=0.5,
        margin="sum",
        beta=0.1,
        reduce_sum=two_process_reduce(0.1 * theirs, "pooled"),
    )
    psi = 0.1 * (1 + 3 + 10) / 3  # Eq. 12: the mean over all three pairs of β·(Δ_w − Δ_l)
    assert float(paper) == pytest.approx(max(0.01, 1 - sigmoid(0.5 * psi)), abs=1e-6)
    official = objectives.napo_q(
        "official", mine, mine / 2, alpha=0.5, margin="sum", beta=0.1, reduce_sum=two_process_reduce(theirs, "means")
    )
    psi = ((1 + 3) / 2 + 10) / 2  # the released code: the mean of the two processes' means, no β
    assert float(official) == pytest.approx(float(released_q(psi, 0.5)), abs=1e-6)
    # margin="mean" reads the per-token differences; a fixed q is returned as is.
    per_token = objectives.napo_q("paper", mine, mine / 2, alpha=0.5, margin="mean", beta=0.1)
    assert float(per_token) == pytest.approx(1 - sigmoid(0.5 * 0.1 * 1.0), abs=1e-6)
    assert float(objectives.napo_q(0.3, mine, mine, alpha=0.5, margin="sum", beta=0.1)) == pytest.approx(0.3)


def test_napo_q_of_a_process_without_pairs_uses_the_others():
    theirs = torch.tensor([4.0, 8.0])
    empty = torch.zeros(0)
    q = objectives.napo_q(
        "official", empty, empty, alpha=0.01, margin="sum", beta=0.1, reduce_sum=two_process_reduce(theirs, "means")
    )
    assert float(q) == pytest.approx(float(released_q(6.0, 0.01)), abs=1e-6)


def test_reward_statistics_hand_values():
    chosen, negative = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])  # Δ_w, Δ_l; β = 0.5
    stats = objectives.reward_statistics(chosen, negative, 0.5)
    expected = {
        "rewards/chosen": 0.5 * 1.5 / 3,
        "rewards/rejected": 0.5 * 2.5 / 3,
        "rewards/margins": 0.5 * (1.0 - 2.0 + 0.0) / 3,
        "rewards/accuracies": 1 / 3,  # only the first pair has z > 0 (z = 0 is not a win)
    }
    assert {name: float(value) for name, value in stats.items()} == pytest.approx(expected)
    # Pooled with a second process holding one pair of z = 0.5·(4 − 0) = 2 (a win).
    pooled = objectives.reward_statistics(chosen, negative, 0.5, two_process_reduce(torch.tensor([1.0]), "pooled"))
    assert float(pooled["rewards/accuracies"]) == pytest.approx(2 / 4)


def test_type_weights_fixed_and_dynamic():
    fixed = objectives.normalised_weights({"rejected": 0.02, "rejected_language_bias": 0.49})
    assert fixed == pytest.approx({"rejected": 0.02 / 0.51, "rejected_language_bias": 0.49 / 0.51})
    psi = {"rejected": torch.tensor(0.2), "rejected_language_bias": torch.tensor(1.8)}
    assert objectives.type_weights(psi, "fixed", fixed) == fixed
    assert objectives.type_weights(psi, "dynamic", fixed, 0.01) == pytest.approx(
        {"rejected": 0.1, "rejected_language_bias": 0.9}
    )
    with pytest.raises(ValueError, match="sum to 0"):
        objectives.normalised_weights({"rejected": 0.0})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"objective": "simpo"}, "objective='simpo' is not one of"),
        ({"q": "median"}, "q must be 'paper', 'official' or a number"),
        ({"q": "1.5"}, r"a fixed q must be in \(0, 1\]"),
        ({"q_min": 0.0}, "q_min must be in"),
        ({"weights": "equal"}, "weights must be 'dynamic' or 'fixed'"),
        ({"weight_min": -0.1}, "weight_min must be in"),
        ({"objective": "rdpo", "label_smoothing": 0.5}, "rdpo needs label_smoothing"),
    ],
)
def test_objective_settings_are_checked(settings, message):
    good = {"objective": "napo", "q": "paper", "q_min": None, "weights": "dynamic", "weight_min": 0.01}
    with pytest.raises(ValueError, match=message):
        objectives.check_objective_settings(**{**good, "label_smoothing": 0.0, **settings})
    assert objectives.check_objective_settings(**good, label_smoothing=0.0) == "paper"
    assert objectives.check_objective_settings(**{**good, "q": "0.25"}, label_smoothing=0.0) == 0.25
