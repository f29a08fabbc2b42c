"""method=mae: the visible-only encoder, the decoder's order, MAE's optimisation and its config."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ssl_vit.build import build_datamodule, build_method, validate
from ssl_vit.data.sampler import SampleKey, sample_seed
from ssl_vit.methods.mae import MAE
from ssl_vit.models.pos_embed import sincos_2d_table
from tests.methods.training_helpers import compose_train

# A tiny MAE on synthetic data: 32 px images, 8x8 patches of 4 px, 16 kept.
MAE_TINY = ["method=mae", "data=synthetic", "data.options.num_samples=128", "data.val_size=64",
            "data.batch_size=16", "data.num_workers=0", "model.depth=2", "method.crops.global_size=32",
            "method.decoder.embed_dim=32", "method.decoder.depth=1", "method.decoder.num_heads=2",
            "trainer.precision=32", "trainer.max_steps=20"]


def build(overrides=()):
    cfg = compose_train(MAE_TINY + list(overrides))
    validate(cfg)
    torch.manual_seed(0)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return cfg, datamodule, build_method(cfg, datamodule)


def test_cpu_recipe_gives_mae_only_the_keys_it_uses():
    cfg = compose_train(["method=mae"])
    assert cfg.method.name == "mae" and cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05
    for key in ("head", "momentum_teacher", "teacher_temp", "freeze_last_layer_epochs", "koleo_loss_weight"):
        assert key not in cfg.method, key
    for key in ("local_size", "local_scale"):
        assert key not in cfg.method.crops, key
    assert "weight_decay_end" not in cfg.optim and "clip_grad" not in cfg.optim
    assert cfg.method.crops.augmentation == "mae" and cfg.method.crops.global_scale == [0.2, 1.0]
    assert cfg.model.pos_embed == "sincos" and cfg.model.img_size == cfg.method.crops.global_size


def test_paper_recipe_keeps_the_published_values():
    cfg = compose_train(["experiment=mae_vitb16"])
    expected = {"method.name": "mae", "model.name": "vit_base", "model.patch_size": 16, "model.pos_embed": "sincos",
                "method.norm_pix_loss": True, "method.mask_ratio": 0.75, "method.decoder.embed_dim": 512,
                "method.decoder.depth": 8, "method.decoder.num_heads": 16, "optim.lr": 1.5e-4,
                "optim.warmup_epochs": 40, "optim.weight_decay": 0.05, "optim.min_lr": 0.0,
                "method.crops.global_scale": [0.2, 1.0]}
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 4096
    assert cfg.trainer.max_steps == 800 * cfg.steps_per_epoch


def test_positions_are_added_before_the_visible_patches_are_gathered():
    _, _, method = build()
    encoder = method.encoder.eval()
    images = torch.randn(2, 3, 32, 32)
    ids_keep = torch.tensor([[5, 63, 0, 17], [40, 2, 9, 33]])
    # Naive: every patch embedded and given its own position, then only the kept ones go on.
    patches, _ = encoder.patch_embed(images)
    patches = patches + sincos_2d_table(encoder.embed_dim, 8, 8)
    kept = torch.stack([patches[b, ids_keep[b]] for b in range(2)])
    x = torch.cat([encoder.cls_token.expand(2, -1, -1), kept], dim=1)
    for block in encoder.blocks:
        x = block(x)
    expected = encoder.norm(x)
    out = encoder.forward_visible(images, ids_keep)
    torch.testing.assert_close(out["x_norm_patchtokens"], expected[:, 1:])
    torch.testing.assert_close(out["x_norm_clstoken"], expected[:, 0])


def test_encoder_blocks_see_visible_tokens_only_and_decoder_blocks_all_of_them():
    _, _, method = build(["method.mask_ratio=0.75"])
    seen = {}

    def record(name):
        return lambda module, args: seen.setdefault(name, []).append(args[0].shape[1])

    hooks = [method.encoder.blocks[i].register_forward_pre_hook(record(f"encoder{i}")) for i in range(2)]
    hooks.append(method.decoder.blocks[0].register_forward_pre_hook(record("decoder0")))
    pred, mask = method.reconstruct(torch.randn(3, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert seen == {"encoder0": [1 + 16], "encoder1": [1 + 16], "decoder0": [1 + 64]}
    assert pred.shape == (3, 64, 4 * 4 * 3) and mask.sum(1).tolist() == [48, 48, 48]


def test_decoder_inserts_mask_tokens_and_restores_patch_order():
    _, _, method = build()
    decoder = method.decoder
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    captured = {}
    hook = decoder.blocks[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    out = method.encoder.forward_visible(images, torch.argsort(noise, 1)[:, :16])
    method.reconstruct(images, noise)
    hook.remove()
    x = captured["x"]
    patches = x[:, 1:] - sincos_2d_table(decoder.embed_dim, 8, 8)  # positions are the fixed table
    embedded = decoder.decoder_embed(out["x_norm_patchtokens"])
    ids_keep = torch.argsort(noise, 1)[:, :16]
    for b in range(2):
        for k, index in enumerate(ids_keep[b].tolist()):
            torch.testing.assert_close(patches[b, index], embedded[b, k])
        removed = [i for i in range(64) if i not in ids_keep[b].tolist()]
        torch.testing.assert_close(patches[b, removed], decoder.mask_token[0].expand(48, -1))
    torch.testing.assert_close(x[:, 0], decoder.decoder_embed(out["x_norm_clstoken"]))  # no position


def test_weight_decay_spares_biases_and_1d_parameters_but_not_the_tokens():
    _, _, method = build()
    optimizer = method.configure_optimizers()
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    decay_of = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            decay_of[name] = group["weight_decay"]
    assert decay_of["encoder.cls_token"] == 0.05 and decay_of["decoder.mask_token"] == 0.05
    assert decay_of["encoder.blocks.0.attn.qkv.weight"] == 0.05 and decay_of["decoder.pred.weight"] == 0.05
    for name, value in decay_of.items():
        if name.endswith(".bias") or "norm" in name:
            assert value == 0.0, name
    # The backbone's iBOT mask token has no use in MAE: it is not optimised at all.
    assert "encoder.mask_token" not in decay_of and not method.encoder.mask_token.requires_grad
    params = {n for n, p in method.named_parameters() if p.requires_grad}
    assert params == set(decay_of)


def paper_lr(step, steps_per_epoch, total_steps, lr, min_lr, warmup):
    """util/lr_sched.adjust_learning_rate at epoch = step / steps_per_epoch (written out again)."""
    epoch, epochs = step / steps_per_epoch, total_steps / steps_per_epoch
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_lr_is_linearly_scaled_and_follows_the_paper_schedule_each_step():
    cfg, datamodule, method = build(["optim.lr=1e-3", "optim.warmup_epochs=0.5", "optim.min_lr=1e-5",
                                     "steps_per_epoch=8", "trainer.max_steps=20"])
    assert method.base_lr == pytest.approx(1e-3 * 16 / 256)
    expected = [paper_lr(s, 8, 20, 1e-3 * 16 / 256, 1e-5, 0.5) for s in range(20)]
    assert method.lr_at(0) == 0.0
    assert [method.lr_at(s) for s in range(20)] == pytest.approx(expected, rel=1e-12)
    # The value reaches the optimizer at every step (set before the step, as the paper's loop does).
    import lightning as L

    seen = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append({g["lr"] for g in optimizer.param_groups})

    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[Spy()])
    trainer.fit(method, datamodule=datamodule)
    assert [s.pop() for s in seen if len(s) == 1] == pytest.approx(expected, rel=1e-12)
    assert len(seen) == 20


@pytest.mark.parametrize("overrides, message", [
    (["model.pos_embed=rope"], r"model.pos_embed='rope' cannot be used with method=mae"),
    (["method.decoder.num_heads=3"], r"method.decoder.embed_dim=32 is not divisible by method.decoder.num_heads=3"),
    (["method.decoder.embed_dim=30"], r"method.decoder.embed_dim=30: the 2-D sin-cos positions need a multiple of 4"),
    (["method.mask_ratio=1.0"], r"method.mask_ratio=1.0; allowed: a number in \(0, 1\)"),
    (["method.mask_ratio=0.999"], r"method.mask_ratio=0.999 keeps int\(64 x \(1 - 0.999\)\) = 0"),
])
def test_bad_mae_config_fails_before_training_naming_the_key(overrides, message):
    cfg = compose_train(MAE_TINY + overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_training_batches_are_one_augmented_view_per_image():
    cfg, datamodule, _ = build()
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert images.dtype == torch.float32
    # Random crops, a function of (seed, epoch, image): the same image is cropped anew in the
    # next epoch, and identically whenever the same epoch comes again (a resume, another worker).
    dataset = datamodule.train_dataloader().dataset
    first, second = (dataset[SampleKey(0, sample_seed(0, epoch, 0))][0] for epoch in (0, 1))
    assert not torch.equal(first, second)
    assert torch.equal(first, dataset[SampleKey(0, sample_seed(0, 0, 0))][0])


def test_method_is_mae_with_its_encoder_as_the_evaluated_backbone():
    _, _, method = build()
    assert isinstance(method, MAE) and method.evaluation_backbone() is method.encoder
