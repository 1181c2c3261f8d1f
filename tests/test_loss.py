"""Label-guided InfoNCE: masking of false negatives and the label conventions (1 present; 0, -1 for uncertain and
empty all absent)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ace_lora_hf import binarize_labels, false_negative_mask, label_guided_infonce


def test_binarize_labels_treats_missing_and_uncertain_as_absent():
    labels = torch.tensor([[1.0, 0.0, -1.0, float("nan")]])
    assert torch.equal(binarize_labels(labels), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_identical_label_vectors_are_masked_both_ways():
    nan = float("nan")
    labels = torch.tensor([[1.0, 0.0, nan], [0.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 1.0]])
    mask = false_negative_mask(labels)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = True  # [1, 0, 0] after binarising
    assert torch.equal(mask, expected)


def test_loss_matches_hand_computation():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.5, 2.0, 1.5], [1.0, 0.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # 0 and 2 share labels

    def ce(row, target, removed=()):
        kept = [v for j, v in enumerate(row) if j not in removed]
        return math.log(sum(math.exp(v) for v in kept)) - row[target]

    rows, cols = logits.tolist(), logits.t().tolist()
    removed = {0: (2,), 1: (), 2: (0,)}
    expected = (sum(ce(rows[i], i, removed[i]) for i in range(3)) + sum(ce(cols[i], i, removed[i]) for i in range(3)))
    assert label_guided_infonce(logits, labels).item() == pytest.approx(expected / 6, rel=1e-6)


def test_without_labels_it_is_symmetric_clip_loss():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(5)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    torch.testing.assert_close(label_guided_infonce(logits), expected)


def test_all_different_labels_change_nothing():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(label_guided_infonce(logits, torch.eye(4)), label_guided_infonce(logits))


def test_gradient_does_not_flow_into_masked_logits():
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    label_guided_infonce(logits, torch.tensor([[1.0], [0.0], [1.0]])).backward()
    assert logits.grad[0, 2] == 0 and logits.grad[2, 0] == 0
    assert logits.grad[0, 1] != 0
