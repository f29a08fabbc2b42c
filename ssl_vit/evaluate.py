"""python -m ssl_vit.evaluate checkpoint=PATH [data=...] [split=val|test]: frozen-feature evaluation.

The backbone's features (``features=cls``: the [CLS] token, the default; ``mean_patch``: the mean
patch token, MAE's choice; ``cls_avgpool``: both concatenated, DINOv2's linear evaluation) of a
bank (labelled training images) and of query images are extracted once; then
  * weighted k-NN (cosine, T=0.07, k = 10 / 20 / 200; :mod:`ssl_vit.evaluation.knn`), and
  * a linear probe (one ``nn.Linear``, trained with SGD on the bank's features, normalised by the
    bank's statistics; :mod:`ssl_vit.evaluation.linear_probe`), scored on the queries.
Prints ``knn_top1=<k=20 top-1>`` and ``linear_top1=<top-1>`` (when the probe ran) as lines of
their own and writes every figure to ``DIR/metrics.json`` (``hydra.run.dir=DIR``).

Splits: ``split=val`` (default) scores the validation carve-out against the ``train`` split: use it
for tuning and for comparing runs. ``split=test`` scores the test split against all training data
(train + val): use it for final reports only.

Data selection:
  * Without ``data=``: the checkpoint's own data set, from the preprocessing stored in it (training
    checkpoints: ``ckpt["ssl_vit"]["preprocessing"]``; exports: the ``preprocessing`` entry of the
    JSON beside the ``.safetensors``): its name, root, val_size and split_seed (and, for synthetic
    data, num_classes). A ``data.<key>=VALUE`` override replaces that one stored value (e.g.
    ``data.root=/data/here``, ``data.options.num_samples=200``); options the checkpoint does not
    store (e.g. synthetic ``num_samples``) take the data set's defaults unless overridden. Setting
    ``data.name`` to a different data set drops the stored identity (root, val_size, ...): only
    the values given then count, the rest are the data set's defaults.
  * With ``data=NAME``: ``conf/data/NAME.yaml`` as in training (its root, val_size, split_seed,
    options) with ``data.<key>=`` overrides; the checkpoint's data identity is not used.
  * Resolution, mean and std: ``data.image_size`` / ``data.mean`` / ``data.std`` if given, else
    the checkpoint's preprocessing (the backbone saw its images that way), else the data set's
    defaults. Files without preprocessing (outside weights) get the data set's defaults, and
    without ``data=`` the data set is training's default, ``fashion_mnist``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssl_vit.cli import exit_2_on, run_app

log = logging.getLogger("ssl_vit.evaluate")

DEFAULT_DATASET = "fashion_mnist"
PRECISIONS = ("fp32", "bf16")
SPLIT_CHOICES = ("val", "test")
IDENTITY_KEYS = ("root", "val_size", "split_seed")


# -- configuration ------------------------------------------------------------------------------
def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any, minimum: float, strict: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > minimum if strict else value >= minimum


def validate(cfg: DictConfig) -> None:
    """Every check that needs no file and no data, so mistakes fail before any work starts."""
    if cfg.get("checkpoint") in (None, ""):
        raise ValueError(
            "checkpoint=PATH is required: a training checkpoint (.ckpt), an export "
            "(backbone.safetensors with its .json) or outside weights"
        )
    path = Path(str(cfg.checkpoint)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint!r}: no such file ({path.resolve()})")
    from ssl_vit.evaluation.features import check_features

    check_features(str(cfg.features))
    if cfg.linear.get("features"):
        check_features(str(cfg.linear.features), "linear.features")
    if cfg.split not in SPLIT_CHOICES:
        raise ValueError(f"split={cfg.split!r}; allowed: {', '.join(SPLIT_CHOICES)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}; allowed: {', '.join(PRECISIONS)}")
    for key in ("max_train", "max_eval"):
        if cfg.get(key) is not None and not _positive_int(cfg[key]):
            raise ValueError(f"{key}={cfg[key]!r}: expected a positive integer or null (all images)")
    if not _positive_int(cfg.batch_size):
        raise ValueError(f"batch_size={cfg.batch_size!r}: expected a positive integer")
    device = str(cfg.device)
    if device != "auto" and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device={device!r}; allowed: auto, cpu, cuda, cuda:N")
    ks = cfg.knn.ks
    if not OmegaConf.is_list(ks) or len(ks) == 0 or not all(_positive_int(k) for k in ks):
        raise ValueError(f"knn.ks={ks!r}: expected a non-empty list of positive integers")
    if not _number(cfg.knn.temperature, 0, strict=True):
        raise ValueError(f"knn.temperature={cfg.knn.temperature!r}: expected a number > 0")
    lin = cfg.linear
    if lin.enabled:
        for key in ("epochs", "batch_size"):
            if not _positive_int(lin[key]):
                raise ValueError(f"linear.{key}={lin[key]!r}: expected a positive integer")
        if not _number(lin.lr, 0, strict=True):
            raise ValueError(f"linear.lr={lin.lr!r}: expected a number > 0")
        if not _number(lin.weight_decay, 0, strict=False):
            raise ValueError(f"linear.weight_decay={lin.weight_decay!r}: expected a number >= 0")
    if cfg.data.get("num_workers") is not None and (
        isinstance(cfg.data.num_workers, bool) or not isinstance(cfg.data.num_workers, int)
        or cfg.data.num_workers < 0
    ):
        raise ValueError(f"data.num_workers={cfg.data.num_workers!r}: expected an integer >= 0")


# -- checkpoint preprocessing -------------------------------------------------------------------
def read_preprocessing(path: str | Path) -> dict[str, Any] | None:
    """The preprocessing stored with a backbone file, or None (outside weights).

    ``.ckpt``: ``ckpt["ssl_vit"]["preprocessing"]`` (read with ``weights_only=False``, as this
    framework's training checkpoints hold Python objects; memory-mapped, so the tensors are not
    read); other torch files: the same entry if a plain ``weights_only`` load finds one;
    ``.safetensors``: the ``preprocessing`` entry of the JSON beside it.
    """
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        found = meta.get("preprocessing") if isinstance(meta, Mapping) else None
        return dict(found) if isinstance(found, Mapping) else None
    trusted = suffix == ".ckpt"
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is not possible
            ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # outside weights that load_backbone handles on its own
        log.debug("no preprocessing read from %s: %s", path, err)
        return None
    meta = ckpt.get("ssl_vit") if isinstance(ckpt, Mapping) else None
    found = meta.get("preprocessing") if isinstance(meta, Mapping) else None
    return dict(found) if isinstance(found, Mapping) else None


# -- data selection -----------------------------------------------------------------------------
def resolve_data(data_cfg: Mapping[str, Any], preprocessing: Mapping[str, Any] | None,
                 data_group: str | None) -> dict[str, Any]:
    """The data and preprocessing to evaluate on (the rules in this module's docstring).

    ``data_cfg``: the composed ``data`` node (plain dict); ``preprocessing``: the checkpoint's
    (or None); ``data_group``: the ``data=`` choice, None when not given. Returns the keyword
    arguments of :class:`SSLDataModule` plus ``source`` notes for metrics.json.
    """
    stored = dict(preprocessing or {})
    options = {k: v for k, v in dict(data_cfg.get("options") or {}).items() if v is not None}
    if data_group is None and stored.get("dataset"):
        name = data_cfg.get("name") or stored["dataset"]
    else:
        name = data_cfg.get("name") or DEFAULT_DATASET
    use_stored = data_group is None and stored.get("dataset") == name
    identity = {key: data_cfg.get(key) for key in IDENTITY_KEYS}
    if use_stored:
        for key in IDENTITY_KEYS:
            if identity[key] is None:
                identity[key] = stored.get(key)
        if name == "synthetic" and "num_classes" not in options and stored.get("num_classes"):
            options["num_classes"] = int(stored["num_classes"])
    if identity["split_seed"] is None:
        identity["split_seed"] = 0
    pre_source = "checkpoint" if stored else "data set defaults"
    resolved = {
        "dataset": name,
        "root": identity["root"],
        "val_size": identity["val_size"],
        "split_seed": identity["split_seed"],
        "image_size": data_cfg.get("image_size") or stored.get("resolution"),
        "mean": data_cfg.get("mean") or stored.get("mean"),
        "std": data_cfg.get("std") or stored.get("std"),
        "num_workers": data_cfg.get("num_workers") or 0,
        "options": options,
        "source": {
            "data": "checkpoint" if use_stored else (f"data={data_group}" if data_group else "data.* settings"),
            "preprocessing": pre_source,
        },
    }
    return resolved


def build_eval_datamodule(resolved: Mapping[str, Any], batch_size: int):
    from ssl_vit.data.datamodule import SSLDataModule

    return SSLDataModule(
        dataset=resolved["dataset"], root=resolved["root"], batch_size=batch_size,
        num_workers=resolved["num_workers"], val_size=resolved["val_size"],
        split_seed=resolved["split_seed"], image_size=resolved["image_size"],
        mean=resolved["mean"], std=resolved["std"], eval_batch_size=batch_size,
        **resolved["options"],
    )


# -- the evaluation -----------------------------------------------------------------------------
def select_features(features, extracted: str, kind: str):
    """``kind``'s columns of features extracted as ``extracted`` (cls_avgpool = [CLS] | mean patch)."""
    if kind == extracted:
        return features
    cls, mean_patch = features.chunk(2, dim=1)
    return {"cls": cls, "mean_patch": mean_patch}[kind]



def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _features(backbone, loader, device, autocast_dtype, desc: str, progress: bool):
    from tqdm import tqdm

    from ssl_vit.evaluation.knn import extract_features

    batches = tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
    try:
        return extract_features(backbone, batches, device, autocast_dtype)
    finally:
        batches.close()


def run(cfg: DictConfig, out_dir: Path, data_group: str | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint``; returns (and writes to ``out_dir/metrics.json``) the metrics.

    ``data_group``: the ``data=`` choice of the command line (None: the checkpoint's data set).
    """
    validate(cfg)
    import torch

    from ssl_vit import load_backbone
    from ssl_vit.evaluation.features import BackboneFeatures
    from ssl_vit.evaluation.knn import knn_predict
    from ssl_vit.evaluation.linear_probe import linear_probe_top1, train_linear_probe

    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    preprocessing = read_preprocessing(checkpoint)
    resolved = resolve_data(OmegaConf.to_container(cfg.data, resolve=True), preprocessing, data_group)
    if preprocessing is None:
        log.warning("%s stores no preprocessing (outside weights?): evaluating on %s with that data set's "
                    "default resolution / mean / std unless data.image_size / data.mean / data.std are set",
                    checkpoint, resolved["dataset"])
    datamodule = build_eval_datamodule(resolved, cfg.batch_size)
    device = _device(str(cfg.device))
    # One extraction serves both: cls_avgpool holds [CLS] and the mean patch token side by side.
    knn_kind, linear_kind = str(cfg.features), str(cfg.linear.get("features") or cfg.features)
    extracted = knn_kind if knn_kind == linear_kind else "cls_avgpool"
    backbone = BackboneFeatures(load_backbone(checkpoint), extracted).to(device)
    log.info("backbone %s (embed_dim %d) on %s; data %s (%s), split=%s", checkpoint, backbone.embed_dim,
             device, resolved["dataset"], resolved["source"]["data"], cfg.split)

    datamodule.prepare_data()
    bank_loader, query_loader = datamodule.knn_dataloaders(
        cfg.split, batch_size=cfg.batch_size, max_train=cfg.max_train, max_eval=cfg.max_eval,
    )
    autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bank_feats, bank_labels = _features(backbone, bank_loader, device, autocast_dtype,
                                        f"bank ({'train' if cfg.split == 'val' else 'trainval'})", cfg.progress)
    query_feats, query_labels = _features(backbone, query_loader, device, autocast_dtype,
                                          f"queries ({cfg.split})", cfg.progress)
    timings["features_s"] = round(time.perf_counter() - start, 3)
    del backbone
    all_bank, all_query = bank_feats, query_feats
    bank_feats, query_feats = (select_features(f, extracted, knn_kind) for f in (all_bank, all_query))
    num_classes = int(max(bank_labels.max().item(), query_labels.max().item()) + 1)
    if datamodule.num_classes:
        num_classes = max(num_classes, int(datamodule.num_classes))

    metrics: dict[str, Any] = {}
    start = time.perf_counter()
    ks = sorted({int(k) for k in cfg.knn.ks} | {20})
    for k in ks:
        if k > bank_feats.shape[0]:
            log.warning("k=%d is larger than the bank (%d images): all of it votes", k, bank_feats.shape[0])
        predictions = knn_predict(bank_feats, bank_labels, query_feats, k=k,
                                  temperature=float(cfg.knn.temperature), num_classes=num_classes)
        metrics[f"knn_top1_k{k}"] = int((predictions == query_labels).sum()) / query_labels.shape[0]
    metrics["knn_top1"] = metrics["knn_top1_k20"]
    timings["knn_s"] = round(time.perf_counter() - start, 3)
    print(f"knn_top1={metrics['knn_top1']}", flush=True)

    if cfg.linear.enabled:
        start = time.perf_counter()
        lin_bank, lin_query = (select_features(f, extracted, linear_kind) for f in (all_bank, all_query))
        probe = train_linear_probe(
            lin_bank, bank_labels, num_classes, epochs=int(cfg.linear.epochs), lr=float(cfg.linear.lr),
            batch_size=int(cfg.linear.batch_size), weight_decay=float(cfg.linear.weight_decay),
            seed=int(cfg.seed), whiten=bool(cfg.linear.whiten),
        )
        metrics["linear_top1"] = linear_probe_top1(probe, lin_query, query_labels)
        metrics["linear_train_top1"] = linear_probe_top1(probe, lin_bank, bank_labels)
        timings["linear_s"] = round(time.perf_counter() - start, 3)
        print(f"linear_top1={metrics['linear_top1']}", flush=True)

    report = {
        **metrics,
        "split": cfg.split,
        "bank_split": "train" if cfg.split == "val" else "trainval",
        "checkpoint": str(checkpoint),
        "dataset": resolved["dataset"],
        "data": {key: resolved[key] for key in ("dataset", "root", "val_size", "split_seed", "options")},
        "data_source": resolved["source"]["data"],
        "preprocessing": {
            "resolution": datamodule.image_size, "mean": datamodule.mean, "std": datamodule.std,
            "source": resolved["source"]["preprocessing"],
        },
        "num_bank": int(bank_feats.shape[0]),
        "num_query": int(query_feats.shape[0]),
        "features": knn_kind,
        "skipped_files": datamodule.num_skipped,
        "feature_dim": int(bank_feats.shape[1]),
        "num_classes": num_classes,
        "knn": {"ks": ks, "temperature": float(cfg.knn.temperature), "metric": "cosine", "weighting": "exp(s/T)"},
        "linear": {**OmegaConf.to_container(cfg.linear, resolve=True), "seed": int(cfg.seed), "features": linear_kind,
                   "optimizer": "sgd(momentum=0.9), cosine lr",
                   "normalisation": "whitened (bank statistics)" if cfg.linear.whiten else "standardised (bank mean/std)"},
        "max_train": cfg.max_train,
        "max_eval": cfg.max_eval,
        "precision": cfg.precision,
        "device": str(device),
        "timings": timings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if datamodule.num_skipped:
        print(f"skipped {datamodule.num_skipped} unreadable files (named in the warnings above)", flush=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    log.info("k-NN top-1 %s; wrote %s", {k: metrics[f"knn_top1_k{k}"] for k in ks}, out_dir / "metrics.json")
    return report


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
@exit_2_on(ValueError, FileNotFoundError)  # its checks and the data's: all about the command line's input
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run(cfg, Path(hydra_cfg.runtime.output_dir), data_group=hydra_cfg.runtime.choices.get("data"))


if __name__ == "__main__":
    run_app(main)
