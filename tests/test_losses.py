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
