"""The backbone: parameter counts, positions, input paths and the public contract."""
import math

import pytest
import torch

from ssl_vit.models import VisionTransformer, build_backbone, preset
from ssl_vit.models.pos_embed import Rope2D, apply_rope, sincos_2d_table

# Backbone parameter counts (no classifier head) from the ViT / DeiT / DINOv2 papers.
PAPER_PARAMS = {
    "vit_tiny": 5.52e6,
    "vit_small": 21.67e6,
    "vit_base": 85.8e6,
    "vit_large": 303.3e6,
    "vit_huge": 630.8e6,
    "vit_giant": 1.135e9,
}


def small_vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone(preset("vit_cpu", depth=2, **overrides)).eval()


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_papers(name):
    with torch.device("meta"):
        model = build_backbone(preset(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, count


def test_sincos_table_equals_naive_definition():
    dim, rows, cols = 16, 3, 5
    table = sincos_2d_table(dim, rows, cols, cls_token=True)
    quarter = dim // 4
    expected = torch.zeros(1 + rows * cols, dim, dtype=torch.float64)
    for token in range(rows * cols):
        row, col = divmod(token, cols)  # row-major order
        for k in range(quarter):
            omega = 1.0 / 10000 ** (k / quarter)
            expected[1 + token, k] = math.sin(col * omega)
            expected[1 + token, quarter + k] = math.cos(col * omega)
            expected[1 + token, 2 * quarter + k] = math.sin(row * omega)
            expected[1 + token, 3 * quarter + k] = math.cos(row * omega)
    assert table.shape == expected.shape
    assert torch.allclose(table.double(), expected, atol=1e-6)
    assert torch.all(table[0] == 0)  # cls row


def test_output_contract_shapes_and_attributes():
    model = small_vit(num_register_tokens=2)
    images = torch.randn(3, 3, 32, 24)  # non-square
    out = model.forward_features(images)
    assert out["x_norm_clstoken"].shape == (3, 192)
    assert out["x_norm_patchtokens"].shape == (3, 8 * 6, 192)
    assert out["x_norm_regtokens"].shape == (3, 2, 192)
    # forward's [CLS] skips the last block's work for the other tokens: equal up to float rounding
    torch.testing.assert_close(model(images), out["x_norm_clstoken"], rtol=0, atol=1e-5)
    model.set_last_block_pruning(False)
    assert torch.equal(model(images), out["x_norm_clstoken"])
    assert model.embed_dim == 192 and model.patch_size == 4 and isinstance(model.patch_size, int)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos", "rope"])
def test_multicrop_list_equals_separate_calls(pos_embed):
    model = small_vit(pos_embed=pos_embed, num_register_tokens=1)
    globals_, locals_ = torch.randn(2, 3, 32, 32), torch.randn(6, 3, 16, 16)
    masks = torch.rand(2, 64) < 0.3
    together = model.forward_features([globals_, locals_], masks=[masks, None])
    separate = [model.forward_features(globals_, masks), model.forward_features(locals_)]
    for joint, alone in zip(together, separate):
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"):
            assert torch.allclose(joint[key], alone[key], atol=1e-5)


def test_mask_token_replaces_patch_embedding_before_positions():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :10] = True
    tokens, grid = model.prepare_tokens(images, masks)
    positions = model.patch_positions(grid)[0]
    patch_tokens = tokens[:, 1:]
    expected_masked = model.mask_token[0] + positions[:10]
    assert torch.allclose(patch_tokens[0, :10], expected_masked, atol=1e-6)
    unmasked, _ = model.prepare_tokens(images)
    assert torch.allclose(patch_tokens[0, 10:], unmasked[0, 11:], atol=1e-6)
    assert torch.allclose(patch_tokens[1], unmasked[1, 1:], atol=1e-6)
    # A fully masked image no longer depends on its pixels.
    full = torch.ones(2, 64, dtype=torch.bool)
    a = model.forward_features(images, full)["x_norm_clstoken"]
    b = model.forward_features(torch.randn(2, 3, 32, 32), full)["x_norm_clstoken"]
    assert torch.allclose(a, b, atol=1e-6)


def test_visible_only_path():
    model = small_vit(pos_embed="sincos")
    images = torch.randn(2, 3, 32, 32)
    all_ids = torch.arange(64).repeat(2, 1)
    full = model.forward_visible(images, all_ids)
    ref = model.forward_features(images)
    assert torch.allclose(full["x_norm_patchtokens"], ref["x_norm_patchtokens"], atol=1e-5)
    # A subset: positions are added before the patches are selected.
    ids = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    out = model.forward_visible(images, ids)
    tokens, _ = model.prepare_tokens(images)
    kept = torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, ids[..., None].expand(-1, -1, 192))], 1)
    for block in model.blocks:
        kept = block(kept)
    assert out["x_norm_patchtokens"].shape == (2, 16, 192)
    assert torch.allclose(out["x_norm_patchtokens"], model.norm(kept)[:, 1:], atol=1e-5)


def test_last_self_attention_matches_fast_path():
    model = small_vit(num_register_tokens=1)
    images = torch.randn(2, 3, 32, 32)
    attn = model.last_self_attention(images)
    assert attn.shape == (2, 3, 66, 66)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 66), atol=1e-5)
    # The explicit map applied to v reproduces the SDPA output of the last block.
    x, grid = model.prepare_tokens(images)
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1].attn
    h = model.blocks[-1].norm1(x)
    _, _, v = last.split_heads(last.qkv(h), 2, 66)
    manual = (attn @ v).transpose(1, 2).reshape(2, 66, -1)
    assert torch.allclose(manual, last.attend(last.qkv(h), 2, 66, None), atol=1e-5)


def test_rope_is_relative_and_norm_preserving():
    rope = Rope2D(head_dim=8, theta=100.0)
    cos, sin = rope(4, 4)
    q = torch.randn(8).expand(1, 1, 16, 8)
    k = torch.randn(8).expand(1, 1, 16, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # Same vectors at positions with the same offset give the same score.
    score = lambda i, j: (rq[0, 0, i] * rk[0, 0, j]).sum()
    assert torch.allclose(score(0, 5), score(10, 15), atol=1e-5)  # offset (1, 1) both
    assert not torch.allclose(score(0, 5), score(0, 6), atol=1e-3)


def test_learned_positions_interpolate_to_non_square_grids():
    model = small_vit()
    assert torch.equal(model.patch_positions((8, 8)), model.pos_embed[:, 1:])
    assert model.patch_positions((4, 6)).shape == (1, 24, 192)
    assert model(torch.randn(1, 3, 16, 24)).shape == (1, 192)


def test_drop_path_rates_linear_or_uniform():
    ramp = build_backbone(preset("vit_cpu", drop_path_rate=0.3))
    uniform = build_backbone(preset("vit_cpu", drop_path_rate=0.3, drop_path_uniform=True))
    assert [b.drop_path1.drop_prob for b in ramp.blocks] == pytest.approx([0, 0.06, 0.12, 0.18, 0.24, 0.3])
    assert [b.drop_path1.drop_prob for b in uniform.blocks] == pytest.approx([0.3] * 6)
    # Drop path acts in training only.
    images = torch.randn(4, 3, 32, 32)
    ramp.eval()
    assert torch.equal(ramp(images), ramp(images))


def test_swiglu_and_layerscale_options():
    model = small_vit(ffn_layer="swiglu", init_values=1e-5, qkv_bias=False)
    names = dict(model.named_parameters())
    assert "blocks.0.mlp.w12.weight" in names and "blocks.0.ls1.gamma" in names
    assert torch.all(names["blocks.0.ls1.gamma"] == 1e-5)
    assert model.blocks[0].attn.qkv.bias is None


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randn(2, 1, 32, 32), "3-channel.*got 1 channels"),
        (torch.randn(2, 3, 2, 32), "smaller than one 4x4 patch"),
        (torch.randn(2, 3, 30, 32), "not divisible by the patch size 4"),
        (torch.randn(3, 32, 32), r"shape \(B, 3, H, W\), got shape \(3, 32, 32\)"),
    ],
)
def test_bad_images_name_expected_and_received(images, match):
    with pytest.raises(ValueError, match=match):
        small_vit()(images)


def test_bad_masks_name_expected_and_received():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(2, 64\).*got \(2, 16\)"):
        model.forward_features(images, torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor.*got torch.float32"):
        model.forward_features(images, torch.zeros(2, 64))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        build_backbone(preset("vit_cpu", pos_embed="absolute"))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_backbone(preset("vit_cpu", num_heads=5))
    with pytest.raises(ValueError, match="unknown model preset 'vit_mega'"):
        preset("vit_mega")
    with pytest.raises(TypeError, match="unknown backbone argument"):
        build_backbone(preset("vit_cpu", depht=3))


def test_arch_dict_rebuilds_the_same_model():
    model = small_vit(num_register_tokens=3, pos_embed="rope")
    clone = build_backbone(model.arch)
    clone.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(clone.eval()(images), model(images))
