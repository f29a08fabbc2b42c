"""Wrong inputs a new user types fail before any work, with a message that names the key, the
value and what is allowed: in-process through Hydra's compose API (fast), and a few through the
real command line (exit code 2, one screen, no traceback)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ssl_vit.build import validate
from ssl_vit.schema import ConfigError
from ssl_vit.train import prepare

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["data=synthetic", "data.num_workers=0", "model.depth=1", "trainer.precision=32"]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


# Refused by Hydra while composing (a typo of a group option or a key, a value of the wrong type).
COMPOSE_ERRORS = [
    (["model=vit_smal"], r"Could not find 'model/vit_smal'"),
    (["method=dinov3"], r"Could not find 'method/dinov3'"),
    (["model.dept=3"], r"Could not override 'model\.dept'"),
    (["trainer.max_steps=abc"], r"Value 'abc' of type 'str' could not be converted to Integer"),
    (["data.batch_size=big"], r"could not be converted to Integer"),
    (["method=mae", "method.norm_pix_loss=maybe"], r"Value 'maybe' is not a valid bool"),
]


@pytest.mark.parametrize("overrides, message", COMPOSE_ERRORS, ids=[" ".join(o) for o, _ in COMPOSE_ERRORS])
def test_hydra_refuses_typos_and_wrong_types_while_composing(overrides, message):
    with pytest.raises((HydraException, OmegaConfBaseException)) as caught:
        compose_train(overrides)
    # Hydra's message is the exception and its cause (the command line prints both).
    chain = [caught.value, caught.value.__cause__]
    assert any(re.search(message, str(error)) for error in chain if error is not None), chain


# Composed, then refused by validate(cfg): no data read, no model built. Each message names the key.
VALIDATE_ERRORS = [
    (["+method.foo=1"], r"method\.foo: unknown key"),
    (["+trainer.fast=true"], r"trainer\.fast: unknown key"),
    (["+seeds=3"], r"seeds: unknown key \(did you mean seed\?\)"),
    (["trainer.max_steps=0"], r"trainer\.max_steps=0; allowed: an integer >= 1"),
    (["optim.lr=-1"], r"optim\.lr=-1\.0; allowed: a number > 0"),
    (["optim.weight_decay=-1"], r"optim\.weight_decay=-1\.0; allowed: a number >= 0"),
    (["optim.betas=[0.9,1.5]"], r"optim\.betas=\[0\.9, 1\.5\]; allowed: a pair \[b1, b2\], each in \[0, 1\)"),
    (["trainer.precision=17"], r"trainer\.precision=17; allowed: one of auto, 64"),
    (["trainer.devices=0"], r"trainer\.devices=0; allowed: an integer >= 1, -1, auto"),
    (["trainer.accelerator=gpux"], r"trainer\.accelerator='gpux'; allowed: one of auto, cpu"),
    (["resume.schedule=continue"], r"resume\.schedule='continue'; allowed: one of error, extend, restart"),
    (["checkpoint_keep=0"], r"checkpoint_keep=0; allowed: an integer >= 1"),
    (["checkpoint_every_n_minutes=-5"], r"checkpoint_every_n_minutes=-5(\.0)?; allowed: a positive number"),
    (["trainer.deterministic=sometimes"], r"trainer\.deterministic='sometimes'; allowed: true, false or warn"),
    (["model.depth=0"], r"model\.depth=0; allowed: an integer >= 1"),
    (["model.pos_embed=rope2"], r"model\.pos_embed='rope2'; allowed: one of learned, sincos, rope"),
    (["model.attention=flash"], r"model\.attention='flash'; allowed: one of auto, sdpa, explicit"),
    (["method=mae", "data.batched_augmentation=true"], r"data\.batched_augmentation=true: method=mae"),
    (["model.drop_path_rate=1.5"], r"model\.drop_path_rate=1\.5; allowed: a number in \[0, 1\)"),
    (["method.teacher_temp=-1"], r"method\.teacher_temp=-1\.0; allowed: a number > 0"),
    (["method.momentum_teacher=2"], r"method\.momentum_teacher=2\.0; allowed: a number in \[0, 1\]"),
    (["method.ibot.mask_ratio=[0.1,1.5]"], r"method\.ibot\.mask_ratio=\[0\.1, 1\.5\]; allowed"),
    (["method.crops.global_scale=[0.5,0.2]"], r"method\.crops\.global_scale=\[0\.5, 0\.2\]; allowed"),
    (["method.head.out_dim=0"], r"method\.head\.out_dim=0; allowed: an integer >= 1"),
    (["checkpoint_every_n_steps=-1"], r"checkpoint_every_n_steps=-1; allowed: an integer >= 0"),
    (["eval.knn_every_n_steps=-5"], r"eval\.knn_every_n_steps=-5; allowed: an integer >= 0"),
    (["eval.final_knn_max_train=0"], r"eval\.final_knn_max_train=0; allowed: a positive number of images"),
    (["data.batch_size=0"], r"data\.batch_size=0; allowed: an integer >= 1"),
    (["data.num_workers=-1"], r"data\.num_workers=-1; allowed: an integer >= 0"),
    (["data.val_size=-3"], r"data\.val_size=-3; allowed"),
    (["logger=wandb", "logger.mode=sometimes"], r"logger\.mode='sometimes'; allowed: one of auto, online"),
    (["method.crops.global_size=25"], r"method\.crops\.global_size=25 is not a multiple of model\.patch_size=4"),
    (["method.crops.global_size=8", "method.crops.local_size=4"],
     r"method\.crops\.global_size=8 with model\.patch_size=4 gives a 2x2 patch grid; iBOT's block masks"),
    (["trainer.max_steps=-1"], r"set trainer\.max_steps \(or trainer\.max_epochs\)"),
    (["method=mae", "method.mask_ratio=1.0"], r"method\.mask_ratio=1\.0; allowed: a number in \(0, 1\)"),
    (["method=mae", "model.pos_embed=rope"], r"rope"),
    (["method=mae", "method.decoder.embed_dim=100", "method.decoder.num_heads=3"], r"method\.decoder"),
    (["method=distill", "method.teacher.checkpoint=/no/teacher.ckpt"], r"method\.teacher\.checkpoint='/no/teacher"),
    (["method=distill"], r"method\.teacher\.checkpoint"),
    (["ckpt_path=/no/last.ckpt"], r"ckpt_path='/no/last\.ckpt' is not a file"),
    (["model.init=/no/weights.pth"], r"model\.init='/no/weights\.pth' is not a file"),
    (["data=imagefolder", "data.root=/no/images"], r"data\.root='/no/images'"),
]


@pytest.mark.parametrize("overrides, message", VALIDATE_ERRORS, ids=[" ".join(o) for o, _ in VALIDATE_ERRORS])
def test_validate_names_the_key_before_any_work(overrides, message):
    cfg = compose_train(overrides)
    if overrides[0].startswith("data=imagefolder"):  # the folder is looked at when the data is built
        with pytest.raises(ConfigError, match=message) as caught:
            prepare(cfg, Path("/nonexistent-run-dir"))
    else:
        with pytest.raises(ValueError, match=message) as caught:
            validate(cfg)
    assert len(str(caught.value).splitlines()) <= 25


def test_the_smallest_global_grid_for_block_masks_is_accepted_and_dino_needs_none():
    """3x3 patches is the smallest grid DINOv2's block masks are drawn on (8 px was refused above);
    DINO draws no masks, so it trains on 2x2."""
    validate(compose_train(["method.crops.global_size=12", "method.crops.local_size=4"]))
    validate(compose_train(["method=dino", "method.crops.global_size=8", "method.crops.local_size=4"]))


def test_several_problems_are_reported_at_once():
    cfg = compose_train(["optim.lr=-1", "model.depth=0", "+method.foo=1"])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    text = str(caught.value)
    assert all(key in text for key in ("optim.lr=-1.0", "model.depth=0", "method.foo: unknown key"))


def test_too_few_images_for_one_batch_fails_before_training(tmp_path):
    cfg = compose_train(SYNTHETIC + ["data.options.num_samples=40", "data.val_size=4", "data.batch_size=64"])
    with pytest.raises(ConfigError, match=r"data\.batch_size=64 is larger than the \d+ training images"):
        prepare(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_every_recipe_passes_its_schema():
    """The shipped recipes and group options compose and pass the checks (no key a schema lacks)."""
    for overrides in ([], ["method=dino"], ["method=mae"], ["experiment=dino_vits16"],
                      ["experiment=dinov2_vitl16_short"], ["method=mae", "experiment=mae_vitb16"],
                      ["logger=wandb"], ["logger=tensorboard"], ["data=synthetic"],
                      ["model=vit_giant", "method.crops.global_size=42", "method.crops.local_size=14"]):
        validate(compose_train(overrides))


CLI_CASES = [
    (["trainer.max_steps=abc"], "trainer.max_steps"),
    (["model=vit_smal"], "model/vit_smal"),
    (["optim.lr=-1"], "optim.lr=-1.0; allowed: a number > 0"),
    (["+method.foo=1"], "method.foo: unknown key"),
    (["method.crops.global_size=25"], "method.crops.global_size=25"),
]


@pytest.mark.parametrize("overrides, key", CLI_CASES, ids=[" ".join(o) for o, _ in CLI_CASES])
def test_command_line_exits_2_with_one_screen_and_no_traceback(overrides, key, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", *overrides, f"hydra.run.dir={tmp_path}/run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert key in output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) <= 25, output
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("app", ["evaluate", "export", "visualize", "cascade"])
def test_every_app_refuses_an_unknown_key_with_exit_code_2(app, tmp_path):
    """Hydra refuses the key before the app starts (its own exit code would be 1); every entry point
    exits 2 for a command line it cannot run, as training does."""
    result = subprocess.run([sys.executable, "-m", f"ssl_vit.{app}", "no_such_key=1", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no_such_key" in result.stderr


def test_help_lists_every_key_of_the_run_with_type_default_and_rule():
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", "method=mae", "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "  method.mask_ratio (float, 0.75) [a number in (0, 1)]: share of patches removed per image" in result.stdout
    assert "  optim.betas (Tuple[float, float], [0.9, 0.95]) [a pair [b1, b2], each in [0, 1)]" in result.stdout
    assert "method.ibot" not in result.stdout.split("== The composed config")[0]  # DINOv2's keys are not MAE's


def test_every_key_has_a_help_line():
    import dataclasses

    from ssl_vit.schema.methods import METHOD_SCHEMAS, OPTIM_SCHEMAS
    from ssl_vit.schema.model import ModelConfig
    from ssl_vit.schema.run import DataConfig, LoggerConfig, TrainConfig, TrainerConfig

    groups = {"method", "model", "data", "optim", "trainer", "logger"}
    schemas = [*METHOD_SCHEMAS.values(), *OPTIM_SCHEMAS.values(), ModelConfig, DataConfig, LoggerConfig,
               TrainConfig, TrainerConfig]
    while schemas:
        schema = schemas.pop()
        for spec in dataclasses.fields(schema):
            if schema is TrainConfig and spec.name in groups:
                continue
            assert spec.metadata.get("help"), f"{schema.__name__}.{spec.name} has no help line"
            if spec.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(spec.default_factory()):
                schemas.append(type(spec.default_factory()))
