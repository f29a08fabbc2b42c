"""python -m ssl_vit.evaluate: end to end on synthetic data with a checkpoint made here."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ssl_vit.data.datamodule import SSLDataModule
from ssl_vit.evaluate import read_preprocessing, resolve_data, run
from ssl_vit.evaluation.features import BackboneFeatures
from ssl_vit.evaluation.knn import extract_features, knn_top1
from ssl_vit.evaluation.linear_probe import linear_probe_top1, train_linear_probe
from ssl_vit.models import VisionTransformer, preset

REPO = Path(__file__).resolve().parents[2]
PREPROCESSING = {
    "dataset": "synthetic", "root": None, "val_size": 100, "split_seed": 0, "resolution": 32,
    "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3,
}
# Small and fast: 200 bank images, 100 queries, a 2-block backbone, a short probe.
FAST = ["data.options.num_samples=200", "data.num_workers=0", "batch_size=64", "progress=false",
        "linear.epochs=10", "linear.batch_size=50"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return VisionTransformer(**preset("vit_cpu", depth=2)).eval()


@pytest.fixture(scope="module")
def checkpoint(backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({
        "state_dict": {"teacher.backbone." + k: v for k, v in backbone.state_dict().items()},
        "ssl_vit": {"arch": backbone.arch, "backbone_prefix": "teacher.backbone.",
                    "preprocessing": dict(PREPROCESSING)},
    }, path)
    return path


@pytest.fixture(scope="module")
def reference(backbone):
    """Features extracted here, independently of the app, on the same images."""
    dm = SSLDataModule(dataset="synthetic", root=None, val_size=100, split_seed=0, image_size=32,
                       mean=[0.5] * 3, std=[0.5] * 3, num_samples=200)
    bank, query = dm.knn_dataloaders("val", batch_size=64)
    return extract_features(backbone, bank) + extract_features(backbone, query)


def evaluate_cli(*overrides, cwd=REPO):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "ssl_vit.evaluate", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def evaluate_here(tmp_path, *overrides, data_group=None):
    with initialize_config_dir(version_base=None, config_dir=str(REPO / "conf")):
        cfg = compose("evaluate", overrides=list(overrides))
    return run(cfg, tmp_path, data_group=data_group)


def test_cli_end_to_end_on_the_checkpoints_own_data(checkpoint, reference, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_cli(f"checkpoint={checkpoint}", f"hydra.run.dir={out}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())

    lines = result.stdout.splitlines()
    knn_lines = [line for line in lines if line.startswith("knn_top1=")]
    linear_lines = [line for line in lines if line.startswith("linear_top1=")]
    assert len(knn_lines) == 1 and re.fullmatch(r"knn_top1=[0-9.e-]+", knn_lines[0])
    assert len(linear_lines) == 1 and re.fullmatch(r"linear_top1=[0-9.e-]+", linear_lines[0])
    assert float(knn_lines[0].split("=", 1)[1]) == metrics["knn_top1"] == metrics["knn_top1_k20"]
    assert float(linear_lines[0].split("=", 1)[1]) == metrics["linear_top1"]

    # The checkpoint's own data set (synthetic, val_size=100 from its preprocessing) with the
    # data.options.num_samples override: 200 bank images, 100 queries.
    assert metrics["dataset"] == "synthetic" and metrics["data_source"] == "checkpoint"
    assert metrics["split"] == "val" and metrics["bank_split"] == "train"
    assert metrics["checkpoint"] == str(checkpoint.resolve())
    assert (metrics["num_bank"], metrics["num_query"], metrics["feature_dim"]) == (200, 100, 192)
    assert metrics["data"]["val_size"] == 100 and metrics["data"]["options"]["num_samples"] == 200
    assert metrics["preprocessing"]["source"] == "checkpoint"
    assert metrics["preprocessing"]["resolution"] == 32 and metrics["preprocessing"]["mean"] == [0.5] * 3

    # k-NN and the probe agree with an independent computation on features extracted here.
    bank, bank_labels, query, query_labels = reference
    for k in (10, 20, 200):
        expected = knn_top1(bank, bank_labels, query, query_labels, k=k, temperature=0.07)
        assert metrics[f"knn_top1_k{k}"] == pytest.approx(expected, abs=1e-6), k
    probe = train_linear_probe(bank, bank_labels, 10, epochs=10, lr=1.0, batch_size=50, weight_decay=0.0, seed=0)
    assert metrics["linear_top1"] == pytest.approx(linear_probe_top1(probe, query, query_labels), abs=1e-6)
    assert metrics["knn_top1"] > 0.1 or metrics["linear_top1"] > 0.1  # a random ViT beats chance here


def test_cli_without_checkpoint_says_it_is_required(tmp_path):
    result = evaluate_cli(f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "error: checkpoint=PATH is required" in result.stderr
    assert "Traceback" not in result.stderr
    assert "knn_top1=" not in result.stdout


def test_cli_input_errors_exit_2_with_one_line(tmp_path):
    """As the other apps: a missing file or a bad value is one ``error:`` line and exit code 2, and
    so is a key evaluate.yaml does not have (refused by Hydra before the app starts)."""
    missing = evaluate_cli(f"checkpoint={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}/a")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: checkpoint='{tmp_path / 'nope.ckpt'}': no such file" in missing.stderr
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    bad_value = evaluate_cli(f"checkpoint={ckpt}", "knn.ks=[0]", f"hydra.run.dir={tmp_path}/b")
    assert bad_value.returncode == 2 and "error: knn.ks=[0]" in bad_value.stderr
    unknown_key = evaluate_cli(f"checkpoint={ckpt}", "data.batch_size=8", f"hydra.run.dir={tmp_path}/c")
    assert unknown_key.returncode == 2 and "data.batch_size" in unknown_key.stderr


def test_missing_file_and_bad_values_are_named(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        evaluate_here(tmp_path, f"checkpoint={missing}")
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="split='train'"):
        evaluate_here(tmp_path, f"checkpoint={ckpt}", "split=train")
    with pytest.raises(ValueError, match="knn.ks"):
        evaluate_here(tmp_path, f"checkpoint={ckpt}", "knn.ks=[0]")
    with pytest.raises(ValueError, match="linear.lr"):
        evaluate_here(tmp_path, f"checkpoint={ckpt}", "linear.lr=-1")
    with pytest.raises(ValueError, match="data.root must be set.*imagefolder"):
        evaluate_here(tmp_path, f"checkpoint={ckpt}", "data=imagefolder", data_group="imagefolder")


def test_explicit_data_group_test_split_and_no_probe(checkpoint, backbone, tmp_path):
    # data=synthetic: the group's own settings (val_size 500 there), overridden back to the
    # checkpoint's; split=test: bank = train + val (synthetic: train), queries = test split.
    metrics = evaluate_here(tmp_path, f"checkpoint={checkpoint}", "data=synthetic", "data.val_size=100",
                            "split=test", "linear.enabled=false", "knn.ks=[5]", *FAST,
                            data_group="synthetic")
    assert metrics["data_source"] == "data=synthetic" and metrics["split"] == "test"
    assert (metrics["num_bank"], metrics["num_query"]) == (200, 100)
    assert "linear_top1" not in metrics and set(metrics["knn"]["ks"]) == {5, 20}
    dm = SSLDataModule(dataset="synthetic", val_size=100, image_size=32, mean=0.5, std=0.5, num_samples=200)
    bank, query = dm.knn_dataloaders("test", batch_size=64)
    (fb, lb), (fq, lq) = extract_features(backbone, bank), extract_features(backbone, query)
    assert metrics["knn_top1"] == pytest.approx(knn_top1(fb, lb, fq, lq, k=20), abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["knn_top1"] == metrics["knn_top1"]


def test_export_with_json_and_max_eval(backbone, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"arch": backbone.arch, "preprocessing": PREPROCESSING}))
    assert read_preprocessing(path) == PREPROCESSING
    metrics = evaluate_here(tmp_path, f"checkpoint={path}", "max_train=50", "max_eval=30", "linear.epochs=2", *FAST)
    assert (metrics["num_bank"], metrics["num_query"]) == (50, 30)
    assert metrics["dataset"] == "synthetic" and metrics["data"]["val_size"] == 100

    # Outside weights (a bare state dict): no preprocessing, so the data set's defaults.
    bare = tmp_path / "weights.pth"
    torch.save(backbone.state_dict(), bare)
    assert read_preprocessing(bare) is None
    metrics = evaluate_here(tmp_path, f"checkpoint={bare}", "data=synthetic", "data.val_size=20", "max_train=40",
                            "linear.enabled=false", *FAST, data_group="synthetic")
    assert metrics["preprocessing"]["source"] == "data set defaults"
    assert (metrics["num_bank"], metrics["num_query"]) == (40, 20)


def test_data_selection_rules():
    empty = {"name": None, "root": None, "val_size": None, "split_seed": None, "num_workers": 0,
             "image_size": None, "mean": None, "std": None, "options": {"num_samples": None}}
    stored = {**PREPROCESSING, "dataset": "fashion_mnist", "root": "/data/fm", "val_size": 5000,
              "split_seed": 3, "mean": [0.3] * 3, "std": [0.4] * 3}

    # No data=: the checkpoint's data set and identity; data.* overrides replace single values.
    r = resolve_data({**empty, "root": "/elsewhere"}, stored, None)
    assert (r["dataset"], r["root"], r["val_size"], r["split_seed"]) == ("fashion_mnist", "/elsewhere", 5000, 3)
    assert (r["image_size"], r["mean"], r["std"]) == (32, [0.3] * 3, [0.4] * 3)
    assert r["options"] == {}
    # Synthetic checkpoints also keep their number of classes.
    r = resolve_data({**empty, "options": {"num_samples": 200}}, {**PREPROCESSING, "num_classes": 5}, None)
    assert r["options"] == {"num_samples": 200, "num_classes": 5} and r["val_size"] == 100

    # data=NAME: that config's identity; the checkpoint's preprocessing (resolution, mean, std).
    group = {**empty, "name": "synthetic", "val_size": 500, "split_seed": 0, "options": {"num_samples": 2000}}
    r = resolve_data(group, stored, "synthetic")
    assert (r["dataset"], r["root"], r["val_size"], r["split_seed"]) == ("synthetic", None, 500, 0)
    assert (r["mean"], r["std"], r["image_size"]) == ([0.3] * 3, [0.4] * 3, 32)
    # data.image_size / mean / std win over the checkpoint's.
    r = resolve_data({**group, "image_size": 64, "mean": [0.1] * 3}, stored, "synthetic")
    assert (r["image_size"], r["mean"], r["std"]) == (64, [0.1] * 3, [0.4] * 3)

    # data.name naming another data set drops the stored identity.
    r = resolve_data({**empty, "name": "synthetic"}, stored, None)
    assert (r["dataset"], r["root"], r["val_size"], r["split_seed"]) == ("synthetic", None, None, 0)

    # Outside weights (no preprocessing): training's default data set and its defaults.
    r = resolve_data(empty, None, None)
    assert (r["dataset"], r["image_size"], r["mean"], r["std"]) == ("fashion_mnist", None, None, None)
    assert r["source"]["preprocessing"] == "data set defaults"


@pytest.mark.parametrize("kind", ["mean_patch", "cls_avgpool"])
def test_features_option_reads_mean_patch_or_cls_and_mean_patch(checkpoint, backbone, kind, tmp_path):
    metrics = evaluate_here(tmp_path, f"checkpoint={checkpoint}", f"features={kind}", "linear.enabled=false", *FAST)
    dm = SSLDataModule(dataset="synthetic", root=None, val_size=100, split_seed=0, image_size=32,
                       mean=[0.5] * 3, std=[0.5] * 3, num_samples=200)
    feats, labels = {}, {}
    for split, loader in zip(("bank", "query"), dm.knn_dataloaders("val", batch_size=64)):
        parts, ys = [], []
        with torch.no_grad():
            for images, y in loader:  # the patch tokens' mean, by hand; [CLS] first for cls_avgpool
                out = backbone.forward_features(images)
                mean = out["x_norm_patchtokens"].sum(1) / out["x_norm_patchtokens"].shape[1]
                parts.append(mean if kind == "mean_patch" else torch.cat([out["x_norm_clstoken"], mean], 1))
                ys.append(y)
        feats[split], labels[split] = torch.cat(parts), torch.cat(ys)
    assert metrics["features"] == kind
    assert metrics["feature_dim"] == (192 if kind == "mean_patch" else 384)
    expected = knn_top1(feats["bank"], labels["bank"], feats["query"], labels["query"], k=20)
    assert metrics["knn_top1"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="features='pooled'; allowed: cls, mean_patch, cls_avgpool"):
        evaluate_here(tmp_path, f"checkpoint={checkpoint}", "features=pooled")


def test_probe_on_cls_and_mean_patch_while_knn_reads_cls(checkpoint, backbone, reference, tmp_path):
    metrics = evaluate_here(tmp_path, f"checkpoint={checkpoint}", "linear.features=cls_avgpool", *FAST)
    bank, bank_labels, query, query_labels = reference  # [CLS] features
    assert metrics["features"] == "cls" and metrics["linear"]["features"] == "cls_avgpool"
    assert metrics["knn_top1"] == pytest.approx(knn_top1(bank, bank_labels, query, query_labels, k=20), abs=1e-6)
    dm = SSLDataModule(dataset="synthetic", root=None, val_size=100, split_seed=0, image_size=32,
                       mean=[0.5] * 3, std=[0.5] * 3, num_samples=200)
    both = [extract_features(BackboneFeatures(backbone, "cls_avgpool"), loader)[0]
            for loader in dm.knn_dataloaders("val", batch_size=64)]
    probe = train_linear_probe(both[0], bank_labels, 10, epochs=10, lr=1.0, batch_size=50, weight_decay=0.0, seed=0)
    assert metrics["linear_top1"] == pytest.approx(linear_probe_top1(probe, both[1], query_labels), abs=1e-6)


def test_same_seed_gives_identical_figures_and_another_probe_seed_may_not(checkpoint, tmp_path):
    first = evaluate_here(tmp_path / "a", f"checkpoint={checkpoint}", *FAST)
    second = evaluate_here(tmp_path / "b", f"checkpoint={checkpoint}", *FAST)
    keys = ("knn_top1_k10", "knn_top1_k20", "knn_top1_k200", "linear_top1", "linear_train_top1")
    assert [first[k] for k in keys] == [second[k] for k in keys]
    other = evaluate_here(tmp_path / "c", f"checkpoint={checkpoint}", "seed=1", *FAST)
    assert other["knn_top1"] == first["knn_top1"]  # k-NN has no randomness
    assert other["linear"]["seed"] == 1


def test_imagefolder_evaluation_skips_and_counts_unreadable_files(checkpoint, tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 6)):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count // 2):
                pixels = (torch.rand(20, 20, 3, generator=rng) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    metrics = evaluate_here(tmp_path / "out", f"checkpoint={checkpoint}", "data=imagefolder",
                            f"data.root={tmp_path / 'images' / 'train'}",
                            f"+data.options.val_root={tmp_path / 'images' / 'val'}", "data.num_workers=0",
                            "progress=false", "linear.epochs=2", data_group="imagefolder")
    assert metrics["skipped_files"] == 1
    assert (metrics["num_bank"], metrics["num_query"]) == (12, 6)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped_files"] == 1
