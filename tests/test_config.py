"""The Hydra model group agrees with the Python presets; bad model values fail with the key."""
import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssl_vit.config import MODEL_META_KEYS, backbone_arch, build_backbone_from_config
from ssl_vit.models import PRESETS, VisionTransformer
from ssl_vit.schema.model import ModelConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_yaml_matches_preset_and_constructor_defaults(name):
    node = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    assert node.pop("defaults") == [{"/schema/model@_here_": "vit"}, "_self_"]  # typed by ModelConfig
    assert node.name == name
    arch = backbone_arch(node)
    defaults = {
        k: p.default for k, p in inspect.signature(VisionTransformer.__init__).parameters.items()
        if k not in ("self", "in_chans")
    }
    assert set(arch) == set(defaults), "each model yaml lists every backbone argument"
    expected = {**defaults, **PRESETS[name]}
    assert arch == expected


def test_model_schema_declares_every_backbone_argument_with_its_default():
    declared = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    constructor = {k: p.default for k, p in inspect.signature(VisionTransformer.__init__).parameters.items()
                   if k not in ("self", "in_chans")}
    assert set(declared) == set(constructor) | set(MODEL_META_KEYS)
    assert {k: declared[k] for k in constructor} == constructor


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="train", overrides=overrides)


def test_default_train_config_is_dinov2_on_fashion_mnist_cpu_preset():
    cfg = compose_train([])
    assert cfg.method.name == "dinov2"
    assert cfg.data.name == "fashion_mnist"
    assert cfg.model.name == "vit_cpu" and cfg.model.patch_size == 4
    # The short-budget recipe: 24 px global crops, and the backbone's grid follows the crop size.
    assert cfg.method.crops.global_size == 24 and cfg.model.img_size == 24
    assert compose_train(["method.crops.global_size=32"]).model.img_size == 32
    assert cfg.trainer.max_steps == 400 and cfg.data.batch_size == 32


def test_cpu_recipe_values_for_one_method_stay_with_that_method():
    dinov2, dino = compose_train([]), compose_train(["method=dino"])
    # experiment/cpu.yaml: both methods.
    assert dinov2.method.momentum_teacher == dino.method.momentum_teacher == 0.96
    # experiment/for_method/cpu_dinov2.yaml: DINOv2 only.
    assert dinov2.method.koleo_loss_weight == 0.3
    assert dinov2.optim.lr == 0.001 and dino.optim.lr == 0.0005  # DINOv2's base lr x0.25; DINO's own
    assert (dinov2.method.warmup_teacher_temp, dinov2.method.teacher_temp) == (0.04, 0.04)  # held
    # experiment/for_method/cpu_dino.yaml: DINO only, a constant teacher temperature of 0.02 and
    # DINOv2's KoLeo term (DINO's paper recipe keeps 0: test_paper_recipes_keep_the_published_values).
    assert (dino.method.warmup_teacher_temp, dino.method.teacher_temp) == (0.02, 0.02)
    assert dino.method.koleo_loss_weight == 0.3
    # A command-line value still wins over the recipe's.
    assert compose_train(["method.koleo_loss_weight=0.5"]).method.koleo_loss_weight == 0.5


@pytest.mark.parametrize("experiment, expected", [
    ("dino_vits16", {"method.name": "dino", "method.momentum_teacher": 0.996, "method.teacher_temp": 0.04,
                     "method.koleo_loss_weight": 0.0, "method.head.out_dim": 65536, "optim.lr": 0.0005,
                     "model.name": "vit_small"}),
    ("dinov2_vitl16_short", {"method.name": "dinov2", "method.momentum_teacher": 0.992,
                             "method.koleo_loss_weight": 0.1, "method.crops.global_size": 224,
                             "method.warmup_teacher_temp": 0.04, "method.teacher_temp": 0.07,
                             "method.warmup_teacher_temp_epochs": 30,
                             "optim.lr": 0.004, "model.name": "vit_large"}),
])
def test_paper_recipes_keep_the_published_values(experiment, expected):
    cfg = compose_train([f"experiment={experiment}"])
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key


def test_patch_size_override_reaches_the_backbone():
    cfg = compose_train(["model=vit_small", "model.patch_size=8"])
    assert build_backbone_from_config(cfg.model).patch_size == 8


def test_bad_model_value_names_the_value_and_the_allowed_ones():
    cfg = compose_train(["model.pos_embed=absolute"])
    with pytest.raises(ValueError, match=r"pos_embed must be one of .*'absolute'"):
        build_backbone_from_config(cfg.model)
