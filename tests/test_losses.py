"""The auxiliary terms against hand computations."""

import pytest
import torch

from emotune.losses import drift_loss, masked_mean, project, term_loss, warmup_factor


def test_masked_mean_averages_tokens_within_rows_then_rows():
    values = torch.tensor([[1.0, 3.0, 100.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(((1 + 3) / 2 + 10) / 2)


def test_an_empty_row_counts_as_zero_so_splitting_a_batch_changes_nothing():
    values = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6, [1] * 6, [0, 0, 0, 1, 1, 0]])
    whole = masked_mean(values, mask)
    split = sum(masked_mean(values[i : i + 1], mask[i : i + 1]) for i in range(4)) / 4
    torch.testing.assert_close(whole, split)


@pytest.mark.parametrize(
    ("form", "value", "expected"),
    [
        ("penalize", 0.1, [0.0, 0.1, 0.4]),  # ReLU(p - margin)
        ("reward", 0.3, [0.3, 0.1, 0.0]),  # ReLU(target - p)
        ("match", 0.2, [0.04, 0.0, 0.09]),  # (p - target)^2
    ],
)
def test_term_forms_match_the_design_table(form, value, expected):
    proj = torch.tensor([[0.0, 0.2, 0.5]])
    mask = torch.ones(1, 3)
    assert term_loss(form, proj, mask, value).item() == pytest.approx(sum(expected) / 3)


def test_unknown_form_is_rejected():
    with pytest.raises(ValueError, match="unknown form"):
        term_loss("punish", torch.zeros(1, 2), torch.ones(1, 2), 0.0)


def test_drift_does_not_push_the_base_projections():
    proj = torch.randn(2, 3, 5, requires_grad=True)
    base = torch.randn(2, 3, 5, requires_grad=True)
    drift_loss(proj, base, torch.ones(2, 3)).backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert base.grad is None


def test_projection_is_in_units_of_the_residual_norm():
    hidden = torch.tensor([[3.0, 4.0]])
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(project(hidden, vectors, 2.0), torch.tensor([[1.5, 2.0]]))


def test_warmup_ramps_linearly_with_training_progress():
    assert warmup_factor(0, 100, 0.1) == 0.0
    assert warmup_factor(5, 100, 0.1) == pytest.approx(0.5)
    assert warmup_factor(50, 100, 0.1) == 1.0
    assert warmup_factor(0, 100, 0.0) == 1.0


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_packed_segments_give_the_same_mean_as_padded_rows(trailing):
    torch.manual_seed(0)
    lengths = [5, 2, 7]
    rows = [torch.randn(n, *trailing) for n in lengths]
    masks = [torch.rand(n) > 0.4 for n in lengths]
    masks[1][:] = False  # an empty sequence still counts, as 0
    width = max(lengths)
    padded = torch.zeros(len(lengths), width, *trailing)
    padded_mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        padded[i, : len(r)], padded_mask[i, : len(m)] = r, m
    packed = torch.cat(rows)[None]
    packed_mask = torch.cat(masks)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    expected = masked_mean(padded, padded_mask)
    torch.testing.assert_close(masked_mean(packed, packed_mask, segments), expected)
    # trailing padding (segment -1) changes nothing
    pad = torch.zeros(1, 4, *trailing)
    packed_pad = torch.cat([packed, pad + 9.0], 1)
    mask_pad = torch.cat([packed_mask, torch.ones(1, 4, dtype=torch.bool)], 1)
    seg_pad = torch.cat([segments, torch.full((1, 4), -1)], 1)
    torch.testing.assert_close(masked_mean(packed_pad, mask_pad, seg_pad), expected)


def test_push_is_a_squared_hinge_around_the_base_projection():
    from emotune.losses import push_loss

    proj = torch.tensor([[0.0, 0.2, 0.5]])
    base = torch.tensor([[0.1, 0.1, 0.1]])
    mask = torch.ones(1, 3)
    # down: ReLU(p - (base - 0.05))^2 = [0, 0.15^2, 0.45^2]; up: ReLU((base + 0.05) - p)^2 = [0.15^2, 0, 0]
    assert push_loss(proj, base, mask, 0.05, "down").item() == pytest.approx((0.15**2 + 0.45**2) / 3)
    assert push_loss(proj, base, mask, 0.05, "up").item() == pytest.approx(0.15**2 / 3)
    with pytest.raises(ValueError, match="unknown direction"):
        push_loss(proj, base, mask, 0.05, "sideways")


def test_push_and_hold_pass_no_gradient_into_the_base_projection():
    from emotune.losses import hold_loss, push_loss

    proj = torch.tensor([[0.3, -0.2]], requires_grad=True)
    base = torch.tensor([[0.0, 0.0]], requires_grad=True)
    (push_loss(proj, base, torch.ones(1, 2), 0.1, "down") + hold_loss(proj, base, torch.ones(1, 2))).backward()
    assert base.grad is None and proj.grad is not None and proj.grad.abs().sum() > 0


def test_hold_is_the_squared_distance_from_base_on_masked_tokens():
    from emotune.losses import hold_loss

    proj = torch.tensor([[0.3, -0.2, 9.0]])
    base = torch.tensor([[0.1, 0.0, 0.0]])
    assert hold_loss(proj, base, torch.tensor([[1, 1, 0]])).item() == pytest.approx((0.04 + 0.04) / 2)


def test_retain_is_the_squared_hidden_distance_in_units_of_the_residual_norm():
    from emotune.losses import retain_loss

    hidden = torch.zeros(1, 2, 3)
    hidden[0, 0] = torch.tensor([3.0, 4.0, 0.0])  # |h - 0|^2 = 25
    base = torch.zeros(1, 2, 3)
    assert retain_loss(hidden, base, torch.ones(1, 2), scale=5.0).item() == pytest.approx((25 / 25 + 0) / 2)


def test_kl_is_zero_for_equal_logits_and_matches_torch_on_masked_tokens():
    from emotune.losses import kl_loss

    mask = torch.tensor([[1, 0, 1]])
    logits, base = torch.randn(2, 7), torch.randn(2, 7)
    assert kl_loss(base, base, mask).item() == pytest.approx(0.0, abs=1e-7)
    expected = torch.nn.functional.kl_div(
        logits.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none"
    )
    assert kl_loss(logits, base, mask).item() == pytest.approx(expected.sum(-1).mean().item(), rel=1e-5)


def test_push_to_retain_moves_weight_linearly_from_push_to_retain():
    from emotune.losses import schedule_factors

    assert schedule_factors("constant", 5, 10) == (1.0, 1.0)
    assert schedule_factors("push_to_retain", 0, 10) == (1.0, 0.0)
    assert schedule_factors("push_to_retain", 5, 10) == (0.75, 0.25)
    assert schedule_factors("push_to_retain", 10, 10) == (0.5, 0.5)
