"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; each of the k nearest training samples (cosine similarity s) votes
for its class with weight exp(s / T). Defaults: k=20, T=0.07.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] embeddings (N, D) in fp32 and labels (N,) of every batch of ``loader``."""
    (features,), labels = extract_features_of_many([backbone], loader, device, autocast_dtype)
    return features, labels


@torch.no_grad()
def extract_features_of_many(backbones: Sequence[torch.nn.Module], loader: DataLoader,
                             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                             progress: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([features (N, D) of each backbone], labels (N,))`` from one pass over ``loader``:
    decoding and transforming the images often costs as much as a small backbone's forward.
    ``progress``: the label of a progress bar (on stderr) over the batches; None for none."""
    was_training = [backbone.training for backbone in backbones]
    for backbone in backbones:
        backbone.eval()
    device = torch.device(device)
    features: list[list[torch.Tensor]] = [[] for _ in backbones]
    labels = []
    batches = loader if progress is None else tqdm(loader, desc=progress, unit="batch", leave=False)
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            for out, backbone in zip(features, backbones):
                out.append(backbone(images).float().cpu())
        labels.append(torch.as_tensor(targets).cpu())
    for backbone, mode in zip(backbones, was_training):
        backbone.train(mode)
    return [torch.cat(out) for out in features], torch.cat(labels).long()


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 1024) -> torch.Tensor:
    """Predicted class (Q,) of each query by temperature-weighted cosine k-NN."""
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one labelled training feature, got none")
    if (train_labels < 0).any():
        raise ValueError("k-NN needs labelled training features; found labels < 0 (unlabelled data)")
    k = min(k, train_features.shape[0])
    num_classes = int(num_classes or train_labels.max().item() + 1)
    bank = F.normalize(train_features.float(), dim=1)
    predictions = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        # exp((s - s_max) / T): the same votes up to a factor per query, without overflow at small T
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(train_features, train_labels, query_features, query_labels, k: int = 20,
             temperature: float = 0.07) -> float:
    """Top-1 accuracy in [0, 1] of weighted k-NN."""
    num_classes = int(max(train_labels.max().item(), query_labels.max().item()) + 1)
    predictions = knn_predict(train_features, train_labels, query_features, k, temperature, num_classes)
    return (predictions == query_labels).float().mean().item()
