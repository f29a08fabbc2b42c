import math

import pytest
import torch

from ssl_vit.evaluation.knn import knn_predict, knn_top1


def naive_knn(train, labels, query, k, temperature):
    """Deliberately plain loops: cosine similarity, sort, exp(s/T) votes."""
    predictions = []
    for q in query.tolist():
        sims = []
        for x, y in zip(train.tolist(), labels.tolist()):
            dot = sum(a * b for a, b in zip(q, x))
            norm = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in x))
            sims.append((dot / norm, y))
        sims.sort(key=lambda t: -t[0])
        votes = {}
        for s, y in sims[:k]:
            votes[y] = votes.get(y, 0.0) + math.exp(s / temperature)
        predictions.append(max(votes, key=votes.get))
    return torch.tensor(predictions)


def test_matches_naive_implementation():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 5, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    query = torch.randn(25, 5, generator=g)
    for k, t in [(1, 0.07), (5, 0.07), (20, 0.5)]:
        expected = naive_knn(train, labels, query, k, t)
        assert torch.equal(knn_predict(train, labels, query, k, t, chunk_size=7), expected)


def test_weighting_beats_majority_by_hand():
    # Two close neighbours of class 1 outweigh three far ones of class 0 at T=0.07.
    train = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.02]])
    assert knn_predict(train, labels, query, k=5, temperature=0.07).item() == 1
    # With a huge temperature the votes are nearly equal and the majority wins.
    assert knn_predict(train, labels, query, k=5, temperature=100.0).item() == 0


def test_top1_and_bad_input():
    train = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    assert knn_top1(train, labels, train, labels, k=1) == 1.0
    with pytest.raises(ValueError, match="labels < 0"):
        knn_predict(train, torch.tensor([0, -1, 2]), train)


def test_small_temperature_does_not_overflow():
    # exp(1 / 0.005) overflows float32: one neighbour at similarity 1.0 (class 0) against two at
    # 0.999 (class 1). By hand, the votes are e^200 vs 2 e^199.8 = e^200 * 2 e^-0.2 = 1.64 e^200:
    # class 1 wins, as plain Python floats (no overflow up to e^709) confirm. With overflowing
    # float32 votes both classes get inf and the tie goes to class 0.
    train = torch.tensor([[1.0, 0.0], [0.999, math.sqrt(1 - 0.999**2)], [0.999, -math.sqrt(1 - 0.999**2)]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, k=3, temperature=0.005).item() == 1
    assert naive_knn(train, labels, query, 3, 0.005).item() == 1
