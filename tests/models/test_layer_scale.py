"""LayerScale folded into each branch's output projection (``layers.scaled_linear``: the scale
multiplies the weight, not every token) computes the block of the papers,
x + gamma1 * proj(attn(LN(x))), then x + gamma2 * FFN(LN(x)): checked against that block written
out here from the model's own parameters, outputs and every gradient (gammas included)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.models.block import Block
from ssl_vit.models.layers import scaled_linear
from tests.models.forward_comparison import assert_same_outputs_and_grads


def written_out_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The pre-LN block with LayerScale as a product after each branch (DINOv2's ``ls1`` / ``ls2``)."""
    attn, mlp = block.attn, block.mlp
    batch, tokens, dim = x.shape
    h = block.norm1(x)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + block.ls1.gamma * F.linear(attended, attn.proj.weight, attn.proj.bias)
    h = block.norm2(x)
    if hasattr(mlp, "fc1"):
        hidden = F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias))
        out = F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias)
    else:
        gate, value = F.linear(h, mlp.w12.weight, mlp.w12.bias).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * value, mlp.w3.weight, mlp.w3.bias)
    return x + block.ls2.gamma * out


def output_and_grads(block: Block, forward, x: torch.Tensor):
    block.zero_grad()
    x = x.detach().requires_grad_(True)
    out = forward(x)
    (out.sin().sum()).backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    grads["input"] = x.grad.clone()
    return [{"out": out.detach()}], grads


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglu"])
def test_folded_layer_scale_equals_the_written_out_block(ffn_layer):
    block = Block(32, 4, ffn_layer=ffn_layer, init_values=1e-5).eval()
    with torch.no_grad():  # gammas of different sizes and signs, as after training
        block.ls1.gamma.copy_(torch.randn(32))
        block.ls2.gamma.copy_(torch.randn(32) * 0.1)
    x = torch.randn(3, 7, 32)
    reference = output_and_grads(block, lambda t: written_out_block(block, t), x)
    assert_same_outputs_and_grads(*reference, *output_and_grads(block, block, x))
    assert_same_outputs_and_grads(*reference, *output_and_grads(block, lambda t: block.forward_list([t], [None])[0], x))
    assert reference[1]["ls1.gamma"].abs().max() > 0 and reference[1]["ls2.gamma"].abs().max() > 0


def test_scaled_linear_with_and_without_bias():
    x, scale = torch.randn(5, 6), torch.randn(4)
    for bias in (True, False):
        linear = torch.nn.Linear(6, 4, bias=bias)
        torch.testing.assert_close(scaled_linear(linear, x, scale), linear(x) * scale, rtol=1e-6, atol=1e-6)
        assert torch.equal(scaled_linear(linear, x, None), linear(x))
