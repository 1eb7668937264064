"""The data-efficient ViT techniques: shifted patch tokenization, locality self-attention, registers,
sequence pooling, mimetic initialisation and post-norm blocks."""

import pytest
import torch
from torch import nn

from vitlab.inspect.attention import attention_stack, rollout_maps
from vitlab.models import build_model, model_from_config
from vitlab.models.vit import ShiftedPatchTokenizer, ViTConfig
from vitlab.presets import build_run_config

SMALL = {"hidden_size": 32, "num_heads": 4, "num_blocks": 2, "patch_size": 8}


def with_random_head(model):
    nn.init.normal_(model.head.weight)  # the zero-initialised head would hide any difference in the features
    return model.eval()


@pytest.mark.parametrize("settings", [{"stem": "spt"}, {"lsa": True}, {"registers": 3}, {"pool": "seq"}, {"init": "mimetic"},
                                      {"norm": "post", "activation": "relu"}, {"stem": "conv-group"},
                                      {"stem": "spt", "lsa": True, "registers": 2, "pool": "seq", "init": "mimetic"}])
def test_every_technique_keeps_the_attention_path_equal_to_the_fused_one(settings):
    torch.manual_seed(0)
    model = with_random_head(build_model("vit", **SMALL, **settings))
    images = torch.randn(3, 3, 32, 32)
    logits, attention = attention_stack(model, images)
    torch.testing.assert_close(model(images), logits, atol=1e-5, rtol=1e-4)
    tokens = model.config.num_tokens
    assert attention.shape == (2, 3, 4, tokens, tokens)
    assert rollout_maps(model, attention, 32).shape == (3, 32, 32)


def test_shifted_patch_tokenization_sees_the_four_diagonal_half_patch_shifts_without_convolution():
    config = ViTConfig(patch_size=4, hidden_size=16, num_heads=2, stem="spt")
    tokenizer = ShiftedPatchTokenizer(config)
    assert not any(isinstance(m, nn.Conv2d) for m in build_model("vit", **{**SMALL, "stem": "spt"}).modules())
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, 2, 2] = 1.0  # one bright pixel in patch (0, 0)
    shifted = [torch.roll(image, shifts=(-dy, -dx), dims=(2, 3)) for dy, dx in ((0, 0), (-2, -2), (-2, 2), (2, -2), (2, 2))]
    stacked = torch.cat(shifted, dim=1)  # no wrap-around reaches the bright pixel's shifts on an 8×8 image
    expected = torch.nn.functional.unfold(stacked, 4, stride=4).transpose(1, 2)  # (1, 4, 15·16)
    captured = {}
    tokenizer.norm.register_forward_hook(lambda m, i, o: captured.setdefault("patches", i[0]))
    tokenizer(image)
    torch.testing.assert_close(captured["patches"], expected)


@pytest.mark.parametrize("patch_size,height,width", [(4, 8, 8), (4, 8, 16), (2, 6, 10)])
def test_shifted_patches_are_cut_in_unfolds_order_on_any_image_size(patch_size, height, width):
    tokenizer = ShiftedPatchTokenizer(ViTConfig(patch_size=patch_size, hidden_size=16, num_heads=2, stem="spt"))
    images = torch.randn(2, 3, height, width)
    s = tokenizer.shift
    padded = torch.nn.functional.pad(images, (s, s, s, s))
    shifted = [padded[..., s + dy:s + dy + height, s + dx:s + dx + width] for dy, dx in ((0, 0), (-s, -s), (-s, s), (s, -s), (s, s))]
    expected = torch.nn.functional.unfold(torch.cat(shifted, dim=1), patch_size, stride=patch_size).transpose(1, 2)
    captured = {}
    tokenizer.norm.register_forward_hook(lambda m, i, o: captured.setdefault("patches", i[0]))
    assert tokenizer(images).shape == (2, (height // patch_size) * (width // patch_size), 16)
    torch.testing.assert_close(captured["patches"], expected, rtol=0, atol=0)


def test_locality_self_attention_masks_the_diagonal_and_learns_its_temperature():
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, lsa=True)
    _, attention = attention_stack(model, torch.randn(2, 3, 32, 32))
    assert torch.all(attention.diagonal(dim1=-2, dim2=-1) == 0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    model.train()
    model.head.weight.data.normal_()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(block.attention.log_temperature.grad is not None and block.attention.log_temperature.grad != 0 for block in model.blocks)


def test_registers_take_part_in_attention_but_not_in_the_maps():
    torch.manual_seed(0)
    model = with_random_head(build_model("vit", **SMALL, registers=4))
    _, attention = attention_stack(model, torch.randn(2, 3, 32, 32))
    assert attention.shape[-1] == 1 + 16 + 4
    assert attention[..., 0, 17:].sum() > 0  # the CLS token attends to the registers
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.register_tokens.grad.abs().sum() > 0


def test_sequence_pooling_is_a_softmax_weighting_of_the_patch_tokens():
    torch.manual_seed(0)
    model = build_model("vit", **SMALL, pool="seq")
    tokens = torch.randn(2, 16, 32)
    weights = model.pool_weights(tokens).softmax(dim=1)
    torch.testing.assert_close(model.pool(tokens), (weights * tokens).sum(dim=1))
    assert model.cls_token is None


def test_mimetic_init_makes_query_key_products_near_identity_and_value_output_near_minus_identity():
    torch.manual_seed(0)
    hidden = 64
    model = build_model("vit", hidden_size=hidden, num_heads=4, num_blocks=1, init="mimetic")
    attention = model.blocks[0].attention
    weight = attention.qkv.weight.detach()
    query, key, value = weight[:hidden], weight[hidden:2 * hidden], weight[2 * hidden:]
    head = slice(0, 16)
    query_key = query[head].T @ key[head]  # (D, D), rank 16: the best rank-16 fit of 0.7 Z + 0.7 I
    assert query_key.diagonal().mean() > 0.15 and query_key.trace() > 3 * query_key.abs().mean() * hidden
    value_output = value.T @ attention.projection.weight.detach().T  # full rank: exactly 0.4 Z - 0.4 I
    assert value_output.diagonal().mean() == pytest.approx(-0.4, abs=0.1)
    off_diagonal = value_output - torch.diag(value_output.diagonal())
    assert off_diagonal.std() == pytest.approx(0.4 / hidden**0.5, rel=0.15)
    default = build_model("vit", hidden_size=hidden, num_heads=4, num_blocks=1).blocks[0].attention.qkv.weight.detach()
    assert abs((default[:16].T @ default[hidden:hidden + 16]).diagonal().mean()) < 0.01


def load_block_into(reference: nn.TransformerEncoderLayer, block) -> nn.TransformerEncoderLayer:
    """Copy a vitlab Block's weights into a TransformerEncoderLayer of the same sizes."""
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(block.attention.qkv.weight)
        reference.self_attn.in_proj_bias.copy_(block.attention.qkv.bias)
        reference.self_attn.out_proj.load_state_dict(block.attention.projection.state_dict())
        reference.linear1.load_state_dict(block.mlp[0].state_dict())
        reference.linear2.load_state_dict(block.mlp[3].state_dict())
        reference.norm1.load_state_dict(block.attention_norm.state_dict())
        reference.norm2.load_state_dict(block.mlp_norm.state_dict())
    return reference


def test_a_post_norm_block_matches_torch_transformer_encoder_layer():
    torch.manual_seed(0)
    model = build_model("vit", hidden_size=32, num_heads=4, num_blocks=1, mlp_ratio=2.0, norm="post", activation="relu").eval()
    block = model.blocks[0]
    reference = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="relu", batch_first=True, norm_first=False).eval()
    load_block_into(reference, block)
    tokens = torch.randn(2, 17, 32)
    torch.testing.assert_close(block(tokens)[0], reference(tokens), atol=1e-5, rtol=1e-4)


def test_vit_seed003_blocks_are_seed_003s_transformer_encoder_layer():
    """Seed 003 writes nn.TransformerEncoderLayer(128, 8, dim_feedforward=512, activation='gelu'): post-norm, GELU,
    dropout 0.1 (the attention weights included). In eval mode a block must compute what that layer computes."""
    config = build_run_config(None, "vit-seed003", {})
    model = model_from_config(config.model).eval()
    reference = nn.TransformerEncoderLayer(128, 8, dim_feedforward=512, activation="gelu", batch_first=True).eval()
    assert (config.model.dropout, config.model.attention_dropout) == (reference.dropout.p, reference.self_attn.dropout) == (0.1, 0.1)
    block = model.blocks[0]
    load_block_into(reference, block)
    tokens = torch.randn(2, 65, 128)
    with torch.no_grad():
        torch.testing.assert_close(block(tokens)[0], reference(tokens), atol=1e-5, rtol=1e-4)
