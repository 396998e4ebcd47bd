"""Auto-DeepLab's network level: masked β normalisation and the Viterbi path, checked against brute force."""

import itertools
import math

import pytest
import torch

from dints3d.spaces.autodeeplab.decode import (
    STEPS,
    transition_log_probs,
    valid_transitions,
    viterbi,
)


def brute_force(log_probs: torch.Tensor) -> tuple[list[int], float]:
    """Enumerate every transition sequence from the stem; the best valid one and its log-probability."""
    num_layers, num_levels, _ = log_probs.shape
    best, best_path = -math.inf, None
    for moves in itertools.product(range(len(STEPS)), repeat=num_layers):
        level, total, path = 0, 0.0, []
        for layer, t in enumerate(moves):
            total += float(log_probs[layer, level, t])
            level += STEPS[t]
            if not 0 <= level < num_levels or total == -math.inf:
                total = -math.inf
                break
            path.append(level)
        if total > best:
            best, best_path = total, path
    return best_path, best


def test_valid_transitions_follow_the_trellis():
    valid = valid_transitions(4, 3)
    # the stem is one node at stride 4: it can stay or go down, never up; other level-0 rows at layer 0 are void
    assert valid[0].tolist() == [[True, True, False], [False] * 3, [False] * 3]
    assert valid[1].tolist() == [[True, True, False], [True, True, True], [False] * 3]
    # the coarsest level cannot go down, the finest cannot go up
    assert valid[3].tolist() == [[True, True, False], [True, True, True], [False, True, True]]


@pytest.mark.parametrize("num_levels", [2, 3, 4])
@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 5, 6])
def test_viterbi_equals_brute_force(num_layers, num_levels):
    valid = valid_transitions(num_layers, num_levels)
    gen = torch.Generator().manual_seed(100 * num_layers + num_levels)
    for trial in range(5):
        beta = torch.randn(num_layers, num_levels, 3, generator=gen) * (0.5 + 2 * trial)
        log_probs = transition_log_probs(beta, valid)
        path, score = viterbi(log_probs)
        expected_path, expected = brute_force(log_probs)
        assert path == expected_path
        assert score == pytest.approx(expected, abs=1e-9)
        # the reported score is the path's own log-probability
        levels = [0, *path]
        own = sum(float(log_probs[i, levels[i], STEPS.index(levels[i + 1] - levels[i])]) for i in range(num_layers))
        assert score == pytest.approx(own, abs=1e-9)


def test_viterbi_is_not_greedy():
    # greedy goes down first (0.6) but then must pay for the coarse level; the best path stays at stride 4
    valid = valid_transitions(2, 2)
    probs = torch.zeros(2, 2, 3)
    probs[0, 0] = torch.tensor([0.6, 0.4, 0.0])
    probs[1, 0] = torch.tensor([0.0, 1.0, 0.0])
    probs[1, 1] = torch.tensor([0.0, 0.5, 0.5])
    log_probs = probs.log().masked_fill(~valid, -math.inf)
    path, score = viterbi(log_probs)
    assert path == [0, 0] and score == pytest.approx(math.log(0.4))


def test_outgoing_probabilities_are_masked_softmaxes():
    valid = valid_transitions(5, 4)
    beta = torch.randn(5, 4, 3, requires_grad=True)
    probs = transition_log_probs(beta, valid).exp()
    reachable = valid.any(-1)
    assert torch.allclose(probs.sum(-1)[reachable], torch.ones(int(reachable.sum())), atol=1e-6)
    assert (probs[~valid] == 0).all() and (probs.sum(-1)[~reachable] == 0).all()
    # a boundary node's two transitions are the softmax of its two valid logits alone (no 3-way softmax × 3/2)
    finest, coarsest = beta[3, 0].detach(), beta[3, 3].detach()
    assert torch.allclose(probs[3, 0, :2], torch.softmax(finest[:2], 0), atol=1e-6)
    assert torch.allclose(probs[3, 3, 1:], torch.softmax(coarsest[1:], 0), atol=1e-6)
    # invalid logits neither matter nor learn
    (probs * torch.randn(5, 4, 3)).sum().backward()
    assert (beta.grad[~valid] == 0).all() and (beta.grad[valid] != 0).any()
    moved = beta.detach().clone()
    moved[~valid] += 100.0
    assert torch.equal(transition_log_probs(moved, valid), transition_log_probs(beta.detach(), valid))
