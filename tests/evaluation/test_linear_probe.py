import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.evaluation.linear_probe import (
    linear_probe_predict,
    linear_probe_top1,
    normalizer,
    train_linear_probe,
)


def blobs(n_per_class, num_classes=4, dim=16, spread=0.5, seed=0, offset=3.0, scale=None):
    """Gaussian blobs around well-separated centres, with an offset and per-dimension scales so
    the standardisation has something to do."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 2.0
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    scale = torch.linspace(0.1, 10.0, dim) if scale is None else scale
    return feats * scale + offset, labels


def naive_logits(probe: torch.nn.Linear, feats: torch.Tensor) -> list[list[float]]:
    """Plain loops over the layer's parameters: one dot product per class."""
    w, b = probe.weight.tolist(), probe.bias.tolist()
    return [[sum(wi * xi for wi, xi in zip(w_c, row)) + b_c for w_c, b_c in zip(w, b)] for row in feats.tolist()]


def test_separable_blobs_are_learned():
    train, train_labels = blobs(200, seed=0)
    test, test_labels = blobs(100, seed=1)
    probe = train_linear_probe(train, train_labels, num_classes=4, epochs=20, batch_size=64)
    assert linear_probe_top1(probe, test, test_labels) > 0.95
    assert linear_probe_top1(probe, train, train_labels) > 0.95
    assert not probe.training


def test_random_labels_give_chance():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(2000, 32, generator=g)
    train_labels = torch.randint(0, 4, (2000,), generator=g)
    test = torch.randn(4000, 32, generator=g)
    test_labels = torch.randint(0, 4, (4000,), generator=g)
    probe = train_linear_probe(train, train_labels, num_classes=4, epochs=20, batch_size=128)
    # chance is 0.25; 4,000 queries: std of the accuracy about 0.007
    assert abs(linear_probe_top1(probe, test, test_labels) - 0.25) < 0.04


def test_deterministic_with_seed():
    train, labels = blobs(50, spread=2.0, seed=3)
    kwargs = dict(num_classes=4, epochs=3, batch_size=32, weight_decay=1e-4)
    a = train_linear_probe(train, labels, seed=7, **kwargs)
    b = train_linear_probe(train, labels, seed=7, **kwargs)
    c = train_linear_probe(train, labels, seed=8, **kwargs)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)  # another shuffling order


@pytest.mark.parametrize("whiten", [True, False])
def test_predictions_match_naive_computation(whiten):
    train, labels = blobs(60, spread=3.0, seed=4)  # overlapping: not every prediction is right
    query, query_labels = blobs(40, spread=3.0, seed=5)
    probe = train_linear_probe(train, labels, num_classes=4, epochs=5, lr=1.0, batch_size=50, whiten=whiten)
    assert isinstance(probe, torch.nn.Linear) and tuple(probe.weight.shape) == (4, 16)
    logits = naive_logits(probe, query)
    expected = torch.tensor([max(range(4), key=lambda c: row[c]) for row in logits])
    margins = [sorted(row)[-1] - sorted(row)[-2] for row in logits]
    assert min(margins) > 1e-3  # no near-ties that float rounding could flip
    assert torch.allclose(probe(query), torch.tensor(logits), atol=1e-3, rtol=1e-4)
    assert torch.equal(linear_probe_predict(probe, query), expected)
    correct = sum(int(p == y) for p, y in zip(expected.tolist(), query_labels.tolist()))
    assert linear_probe_top1(probe, query, query_labels) == correct / len(query_labels)
    assert 0.3 < correct / len(query_labels) < 1.0


def test_normalizer_standardises_and_whitens():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    feats = torch.randn(5000, 8, generator=g) @ mix * torch.linspace(0.1, 10, 8) + 3.0
    mean, transform = normalizer(feats, whiten=False)
    z = (feats.double() - mean) @ transform
    assert torch.allclose(z.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-9)
    assert torch.count_nonzero(transform - torch.diag(torch.diagonal(transform))) == 0
    mean, transform = normalizer(feats, whiten=True)
    z = (feats.double() - mean) @ transform
    cov = z.T @ z / z.shape[0]
    # Decorrelated; each eigenvalue l of the standardised covariance becomes l / (l + ridge)
    # with the ridge 1e-3 x their mean (1 here), so the smallest variances stay a little below 1.
    x = feats.double()
    standardised = (x - x.mean(0)) / x.std(0, unbiased=False)
    eigenvalues = torch.linalg.eigvalsh(standardised.T @ standardised / x.shape[0])
    expected = eigenvalues / (eigenvalues + 1e-3 * eigenvalues.mean())
    assert torch.allclose(cov - torch.diag(torch.diagonal(cov)), torch.zeros(8, 8, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(torch.diagonal(cov).sort().values, expected.sort().values, atol=1e-9)


def test_whitening_fixes_correlated_features():
    # Two classes told apart by a small direction hidden under large correlated ones: plain
    # standardisation leaves a badly conditioned problem, whitening does not.
    g = torch.Generator().manual_seed(0)
    n, dim = 2000, 32
    labels = torch.arange(n) % 2
    common = torch.randn(n, 1, generator=g) * 10.0
    feats = common.repeat(1, dim) + 0.3 * torch.randn(n, dim, generator=g)
    feats[:, 0] += 0.6 * (2 * labels - 1)
    test_labels = labels
    test = (torch.randn(n, 1, generator=g) * 10.0).repeat(1, dim) + 0.3 * torch.randn(n, dim, generator=g)
    test[:, 0] += 0.6 * (2 * test_labels - 1)
    kwargs = dict(num_classes=2, epochs=5, lr=1.0, batch_size=256)
    whitened = linear_probe_top1(train_linear_probe(feats, labels, **kwargs), test, test_labels)
    standardised = linear_probe_top1(train_linear_probe(feats, labels, whiten=False, **kwargs), test, test_labels)
    assert whitened > 0.95 and standardised < 0.8


def test_training_lowers_the_loss_from_chance():
    train, labels = blobs(100, spread=1.5, seed=6)
    probe = train_linear_probe(train, labels, num_classes=4, epochs=10, batch_size=64)
    with torch.no_grad():
        loss = F.cross_entropy(probe(train), labels).item()
    assert loss < 0.5 * math.log(4)  # zero-initialised weights start at ln(4)


def test_threads_restored_and_bad_input():
    before = torch.get_num_threads()
    train, labels = blobs(10)
    train_linear_probe(train, labels, epochs=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="labels < 0"):
        train_linear_probe(train, -torch.ones_like(labels))
    with pytest.raises(ValueError, match="linear.epochs"):
        train_linear_probe(train, labels, epochs=0)
    with pytest.raises(ValueError, match="linear.lr"):
        train_linear_probe(train, labels, lr=float("nan"))
    with pytest.raises(ValueError, match="num_classes=2"):
        train_linear_probe(train, labels, num_classes=2)
    with pytest.raises(ValueError, match="at least one"):
        train_linear_probe(train[:0], labels[:0])
