"""Optimizer parameter groups: coverage, weight-decay exclusions, layer-wise lr decay, last layer."""
import pytest
import torch

from ssl_vit.methods.param_groups import apply_lr_wd, build_param_groups
from ssl_vit.models import build_backbone, preset
from ssl_vit.models.heads import DINOHead

DEPTH = 6  # vit_cpu


def modules(norm_last_layer=False, **arch):
    torch.manual_seed(0)
    backbone = build_backbone(preset("vit_cpu", init_values=1e-5, num_register_tokens=4, **arch))
    assert len(backbone.blocks) == DEPTH
    dino = DINOHead(192, 32, hidden_dim=48, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    ibot = DINOHead(192, 24, hidden_dim=48, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    return {"backbone": backbone, "dino_head": dino, "ibot_head": ibot}


def flatten(groups):
    """{full name: (lr_multiplier, wd_multiplier, is_last_layer)}; asserts each name appears once."""
    out = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name in g["param_names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    return out


def dinov2_groups(mods):
    return build_param_groups(mods, weight_decay=0.04, layerwise_decay=0.9, patch_embed_lr_mult=0.2)


def test_every_trainable_parameter_exactly_once():
    for norm_last_layer in (False, True):
        mods = modules(norm_last_layer)
        groups = dinov2_groups(mods)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        trainable = {id(p) for m in mods.values() for p in m.parameters() if p.requires_grad}
        assert set(ids) == trainable
        names = flatten(groups)
        # DINO's frozen weight-norm gain is not trainable, so it is not optimised at all.
        assert ("dino_head.last_layer.weight_g" in names) == (not norm_last_layer)
        # The tensors and names line up.
        named = {f"{k}.{n}": p for k, m in mods.items() for n, p in m.named_parameters()}
        for g in groups:
            for name, p in zip(g["param_names"], g["params"]):
                assert named[name] is p


def test_hand_values_for_a_depth_6_backbone():
    names = flatten(dinov2_groups(modules()))
    r = 0.9
    expected = {
        # (lr multiplier, wd multiplier, is_last_layer), worked out by hand from fidelity.md
        "backbone.cls_token": (r**7, 1.0, False),
        "backbone.register_tokens": (r**7, 1.0, False),
        "backbone.mask_token": (r**7, 1.0, False),
        "backbone.pos_embed": (r**7, 1.0, False),
        "backbone.patch_embed.proj.weight": (r**7 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (r**7 * 0.2, 0.0, False),
        "backbone.blocks.0.norm1.weight": (r**6, 0.0, False),
        "backbone.blocks.0.norm1.bias": (r**6, 0.0, False),
        "backbone.blocks.0.attn.qkv.weight": (r**6, 1.0, False),
        "backbone.blocks.0.attn.qkv.bias": (r**6, 0.0, False),
        "backbone.blocks.0.ls1.gamma": (r**6, 0.0, False),
        "backbone.blocks.2.mlp.fc1.weight": (r**4, 1.0, False),
        "backbone.blocks.5.attn.proj.weight": (r**1, 1.0, False),
        "backbone.blocks.5.ls2.gamma": (r**1, 0.0, False),
        "backbone.blocks.5.norm2.weight": (r**1, 0.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "backbone.norm.bias": (1.0, 0.0, False),
        "dino_head.mlp.0.weight": (1.0, 1.0, False),
        "dino_head.mlp.0.bias": (1.0, 0.0, False),
        "dino_head.mlp.4.weight": (1.0, 1.0, False),
        "dino_head.last_layer.weight_v": (1.0, 1.0, True),
        # DINOv2 decays the (out, 1)-shaped learnt gain: not a bias, norm or gamma.
        "dino_head.last_layer.weight_g": (1.0, 1.0, True),
        "ibot_head.last_layer.weight_v": (1.0, 1.0, True),
        "ibot_head.mlp.2.bias": (1.0, 0.0, False),
    }
    for name, (lr, wd, last) in expected.items():
        got = names[name]
        assert got[0] == pytest.approx(lr, rel=1e-12), name
        assert got[1:] == (wd, last), name


def test_rules_over_all_parameters():
    mods = modules()
    names = flatten(dinov2_groups(mods))
    shapes = {f"{k}.{n}": p.shape for k, m in mods.items() for n, p in m.named_parameters()}
    for name, (lr, wd, last) in names.items():
        parts = name.split(".")
        is_bias_norm_gamma = (
            len(shapes[name]) == 1 or parts[-1] in ("bias", "gamma") or any(p.startswith("norm") for p in parts)
        )
        assert wd == (0.0 if is_bias_norm_gamma else 1.0), name
        assert last == ("last_layer" in parts), name
        if parts[0] != "backbone":
            assert lr == 1.0, name
        elif parts[1] == "blocks":
            assert lr == pytest.approx(0.9 ** (DEPTH - int(parts[2])), rel=1e-12), name
        elif parts[1] == "patch_embed":
            assert lr == pytest.approx(0.9**7 * 0.2, rel=1e-12), name
        elif parts[1] in ("cls_token", "register_tokens", "mask_token", "pos_embed"):
            assert lr == pytest.approx(0.9**7, rel=1e-12) and wd == 1.0, name  # tokens are decayed
        else:
            assert parts[1] == "norm" and lr == 1.0, name


def test_groups_are_merged_and_last_layer_kept_apart():
    groups = dinov2_groups(modules())
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # patch_embed (wd, no wd) + tokens + 6 blocks x (wd, no wd) + final norm/head no-wd
    # + head weights + last layers = 3 + 12 + 1 + 1 + 1
    assert len(groups) == 18
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 1
    assert set(last[0]["param_names"]) == {
        f"{h}.last_layer.{p}" for h in ("dino_head", "ibot_head") for p in ("weight_g", "weight_v")
    }
    assert all(g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"]) for g in groups)
    assert all(isinstance(g["name"], str) and g["name"] for g in groups)
    assert len({g["name"] for g in groups}) == len(groups)


def test_without_layerwise_decay_and_token_exclusion():
    mods = modules()
    names = flatten(build_param_groups(mods, weight_decay=0.04))
    assert {lr for lr, _, _ in names.values()} == {1.0}
    assert names["backbone.cls_token"][1] == 1.0 and names["backbone.pos_embed"][1] == 1.0
    names = flatten(build_param_groups(mods, weight_decay=0.04, exclude_tokens_from_decay=True))
    for tok in ("cls_token", "register_tokens", "mask_token", "pos_embed"):
        assert names[f"backbone.{tok}"][1] == 0.0
    assert names["backbone.blocks.0.attn.qkv.weight"][1] == 1.0


def test_swiglu_backbone_names():
    names = flatten(dinov2_groups(modules(ffn_layer="swiglu")))
    assert names["backbone.blocks.1.mlp.w12.weight"][:2] == pytest.approx((0.9**5, 1.0))
    assert names["backbone.blocks.1.mlp.w3.bias"][:2] == pytest.approx((0.9**5, 0.0))


def test_apply_lr_wd_and_frozen_last_layer_with_adamw():
    mods = modules()
    groups = dinov2_groups(mods)
    opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
    apply_lr_wd(opt, lr=1e-3, weight_decay=0.1, freeze_last_layer=True)
    for g in opt.param_groups:
        want_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(want_lr, abs=0)
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_multiplier"])
    # One step with every gradient set: the last layer stays put, the rest moves.
    head = mods["dino_head"]
    before = head.last_layer.weight_v.detach().clone()
    qkv = mods["backbone"].blocks[0].attn.qkv.weight
    qkv_before = qkv.detach().clone()
    for m in mods.values():
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(head.last_layer.weight_v, before)
    assert not torch.equal(qkv, qkv_before)
    apply_lr_wd(opt, lr=1e-3, weight_decay=0.1, freeze_last_layer=False)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_multiplier"]) for g in opt.param_groups)
