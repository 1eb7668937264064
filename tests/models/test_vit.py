from contextlib import nullcontext

import pytest
import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models import VisionTransformer, ViTConfig, build_model, layers
from vitlab.models.base import VitlabModel
from vitlab.models.fused_block import blocks_as_separate_nodes, blocks_from_python
from vitlab.models.vit import Attention, Block, sincos_position_embedding


def tiny_vit(**overrides) -> VisionTransformer:
    values = dict(patch_size=4, hidden_size=32, num_heads=4, num_blocks=2) | overrides
    return VisionTransformer(ViTConfig(**values))


@pytest.mark.parametrize("patch_size", [1, 2, 4, 5, 6, 8, 32])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_logits_and_attention_shapes(patch_size, pool):
    model = tiny_vit(patch_size=patch_size, pool=pool, num_blocks=1 if patch_size == 1 else 2).eval()
    images = torch.randn(2, 3, 32, 32)
    logits, attention = model(images, return_attention=True)
    grid = -(-32 // patch_size)
    tokens = grid * grid + (pool == "cls")
    assert logits.shape == (2, 10)
    assert len(attention) == model.config.num_blocks
    assert all(a.shape == (2, 4, tokens, tokens) for a in attention)
    torch.testing.assert_close(attention[0].sum(-1), torch.ones(2, 4, tokens))


def test_patch_size_that_does_not_divide_the_image_pads_symmetrically():
    config = ViTConfig(patch_size=6)
    assert config.grid_size == 6 and config.num_patches == 36
    model = VisionTransformer(config)
    assert model.patch_embedding.padding == (2, 2)


@pytest.mark.parametrize("patch_size", [2, 4, 6])
def test_the_patch_embedding_on_the_cpu_is_the_convolution_as_a_matmul_of_flattened_patches(patch_size):
    torch.manual_seed(2)
    embedding = tiny_vit(patch_size=patch_size).patch_embedding
    images = torch.randn(3, 3, 32, 32)
    assert embedding.linear_on_patches(images)
    padded = nn.functional.pad(images, (*embedding.padding, *embedding.padding))
    expected = embedding.projection(padded).flatten(2).transpose(1, 2)  # (B, G*G, D) by the convolution
    tokens = embedding(images)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    tokens.square().sum().backward()
    weight_grad = embedding.projection.weight.grad.clone()
    embedding.zero_grad()
    expected.square().sum().backward()
    torch.testing.assert_close(weight_grad, embedding.projection.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_with_cls_pooling_only_the_cls_token_is_normalised_with_the_same_logits_and_gradients(monkeypatch, autocast):
    monkeypatch.setattr(VisionTransformer, "reads_only_the_cls_token", lambda self: False)  # every block as before
    torch.manual_seed(4)
    model = tiny_vit(pool="cls")
    nn.init.normal_(model.head.weight)  # a zero head (the initial one) would pass no gradient to the blocks
    images = torch.randn(4, 3, 32, 32)
    results, seen = [], []
    for hooked in (False, True):  # a hook on the final norm makes it see every token, as before
        model.zero_grad()
        hook = model.norm.register_forward_hook(lambda module, inputs, output: seen.append(output.shape)) if hooked else None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = model(images)
        logits.float().square().sum().backward()
        if hook is not None:
            hook.remove()
            assert seen == [(4, 65, 32)]
        results.append((logits, [p.grad.clone() for p in model.parameters()]))
    (fast, fast_grads), (full, full_grads) = results
    assert torch.equal(fast, full)
    for got, expected in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"lsa": True}, {"norm": "post"}, {"registers": 2}, {"attention_dropout": 0.3}])
def test_under_cls_pooling_the_last_block_computes_the_cls_token_alone_with_the_same_logits_and_gradients(monkeypatch, overrides):
    torch.manual_seed(5)
    model = tiny_vit(pool="cls", num_blocks=3, **overrides)
    nn.init.normal_(model.head.weight)
    assert model.reads_only_the_cls_token()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    results = []
    for cls_only in (True, False):
        monkeypatch.setattr(VisionTransformer, "reads_only_the_cls_token", lambda self, cls_only=cls_only: cls_only)
        model.zero_grad()
        torch.manual_seed(6)  # the same dropout draws for the tokens both ways read (the CLS row's are drawn apart)
        logits = model.eval()(images) if overrides.get("attention_dropout") else model(images)
        nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (fast, fast_grads), (full, full_grads) = results
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6 * (1 + grad.abs().max().item()), msg=name)
    assert any(grad.abs().sum() > 0 for name, grad in fast_grads.items() if name.startswith("blocks.0."))


def test_under_bf16_autocast_the_cls_tokens_attention_runs_through_the_single_query_kernel(monkeypatch):
    from vitlab.kernels import single_query as single_query_kernel

    if not single_query_kernel.kernel_supports(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(1, 3, 64, dtype=torch.bfloat16), 4):
        pytest.skip("no C compiler for vitlab's kernels")
    torch.manual_seed(7)
    model = tiny_vit(pool="cls", num_blocks=2, lsa=True)
    nn.init.normal_(model.head.weight)
    images = torch.randn(4, 3, 32, 32)
    results = []
    for cls_only in (True, False):
        monkeypatch.setattr(VisionTransformer, "reads_only_the_cls_token", lambda self, cls_only=cls_only: cls_only)
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16), blocks_as_separate_nodes():  # (a fused block's node hides its parts')
            logits = model(images)
        nodes, stack = set(), [logits.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack.extend(next_node for next_node, _ in node.next_functions)
        assert any(node.name().endswith("KernelSingleQueryAttentionBackward") for node in nodes) == cls_only
        logits.float().square().sum().backward()
        results.append((logits.float(), [p.grad.clone() for p in model.parameters()]))
    (fast, fast_grads), (full, full_grads) = results
    torch.testing.assert_close(fast, full, rtol=0.02, atol=0.02)
    for got, expected in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.02 * (1 + expected.abs().max().item()))


def test_sequence_pooling_is_the_softmax_weighted_sum_of_the_normalised_patch_tokens():
    torch.manual_seed(8)
    model = tiny_vit(pool="seq", registers=1)
    tokens = torch.randn(3, 65, 32)
    normalised = nn.functional.layer_norm(tokens, (32,), model.norm.weight, model.norm.bias, model.norm.eps)[:, :64]
    weights = torch.softmax(normalised @ model.pool_weights.weight.T + model.pool_weights.bias, dim=1)  # (B, N, 1)
    torch.testing.assert_close(model.pool(model.norm(tokens)), (weights * normalised).sum(dim=1), rtol=1e-5, atol=1e-5)


def test_attention_maps_and_hooks_in_the_last_block_see_every_token():
    model = tiny_vit(pool="cls").eval()
    images = torch.randn(2, 3, 32, 32)
    _, maps = model(images, return_attention=True)
    assert maps[-1].shape == (2, 4, 65, 65)
    seen = []
    model.blocks[-1].mlp_norm.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert not model.reads_only_the_cls_token()
    model(images)
    assert seen == [(2, 65, 32)]
    assert not tiny_vit(pool="mean").reads_only_the_cls_token() and not tiny_vit(pool="cls", num_blocks=0).reads_only_the_cls_token()


def test_a_hooked_patch_convolution_runs_itself_so_the_hook_sees_it():
    embedding = tiny_vit().patch_embedding
    seen = []
    embedding.projection.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    images = torch.randn(2, 3, 32, 32)
    assert not embedding.linear_on_patches(images)
    assert embedding(images).shape == (2, 64, 32) and seen == [(2, 32, 8, 8)]


@pytest.mark.parametrize("pos_embed,pool", [("learned", "cls"), ("sincos", "mean"), ("sincos", "cls")])
def test_fast_path_and_attention_path_give_the_same_logits(pos_embed, pool):
    model = tiny_vit(pos_embed=pos_embed, pool=pool, patch_size=6).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model(images)
        explicit, _ = model(images, return_attention=True)
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)


def test_attention_block_matches_torch_multihead_attention():
    torch.manual_seed(1)
    block = Block(ViTConfig(hidden_size=32, num_heads=4)).eval()
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(block.attention.qkv.weight)
        reference.in_proj_bias.copy_(block.attention.qkv.bias)
        reference.out_proj.weight.copy_(block.attention.projection.weight)
        reference.out_proj.bias.copy_(block.attention.projection.bias)
    tokens = torch.randn(2, 17, 32)
    normed = block.attention_norm(tokens)
    with torch.no_grad():
        expected_out, expected_weights = reference(normed, normed, normed, average_attn_weights=False)
        for return_attention in (False, True):
            out, weights = block.attention(normed, return_attention=return_attention)
            torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_hidden_size_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(VitlabError, match="hidden_size 64 is not divisible by num_heads 3"):
        ViTConfig(hidden_size=64, num_heads=3)


@pytest.mark.parametrize("bad", [dict(patch_size=0), dict(patch_size=33), dict(pos_embed="rope"), dict(pool="max"),
                                 dict(dropout=1.0), dict(hidden_size=6, num_heads=3, pos_embed="sincos")])
def test_impossible_configs_are_rejected(bad):
    with pytest.raises(VitlabError):
        ViTConfig(**bad)


def test_locality_self_attention_needs_a_second_token_to_attend_to():
    with pytest.raises(VitlabError, match="lsa .* needs at least 2 tokens"):
        ViTConfig(patch_size=32, pool="mean", lsa=True)
    ViTConfig(patch_size=32, pool="cls", lsa=True)  # CLS + one patch: each attends to the other
    ViTConfig(patch_size=32, pool="mean", lsa=True, registers=1)


def test_sincos_positions_are_fixed_and_distinct():
    table = sincos_position_embedding(8, 32)
    assert table.shape == (64, 32)
    assert torch.cdist(table, table).add(torch.eye(64) * 1e3).min() > 0.1  # every position is distinguishable
    model = tiny_vit(pos_embed="sincos")
    assert "position_embedding" not in dict(model.named_parameters())
    torch.testing.assert_close(model.position_embedding[0], sincos_position_embedding(8, 32))


def test_every_parameter_gets_a_gradient():
    model = tiny_vit()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.head.weight.grad.abs().sum() > 0  # the head starts at zero but still learns
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_save_and_load_give_the_same_logits(tmp_path):
    model = tiny_vit(pos_embed="sincos", pool="mean", patch_size=6).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    model.save(tmp_path)
    loaded = VisionTransformer.load(tmp_path).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), loaded(images), rtol=0, atol=0)
    assert loaded.config == model.config
    assert isinstance(VitlabModel.load(tmp_path / "model.safetensors"), VisionTransformer)
    (tmp_path / "results.json").write_text("{}")  # now a finished run's folder: its weights are not replaced
    weights = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(VitlabError, match="holds a finished run"):
        build_model("cnn-small").save(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == weights


def test_loading_the_wrong_kind_or_a_truncated_file_is_a_clear_error(tmp_path):
    build_model("cnn-small").save(tmp_path)
    with pytest.raises(VitlabError, match="holds a 'cnn-small' model, not a VisionTransformer"):
        VisionTransformer.load(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(VitlabError, match="corrupt or truncated"):
        VitlabModel.load(tmp_path)
    with pytest.raises(VitlabError, match="does not exist"):
        VitlabModel.load(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitlabError, match="no saved model"):
        VitlabModel.load(tmp_path / "empty")


@pytest.mark.parametrize("stem", ["conv", "conv-pool", "conv-group"])
@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_conv_stems_reach_the_patch_grid(stem, patch_size):
    model = tiny_vit(stem=stem, patch_size=patch_size, pool="mean").eval()
    logits, attention = model(torch.randn(2, 3, 32, 32), return_attention=True)
    grid = 32 // patch_size
    assert logits.shape == (2, 10) and attention[0].shape[-1] == grid * grid
    with pytest.raises(VitlabError, match="power of 2"):
        ViTConfig(stem=stem, patch_size=6)


def test_conv_pool_stem_sees_every_pixel_through_overlapping_windows():
    """A change to one pixel reaches its own token (and, through the overlapping windows, neighbours)."""
    model = tiny_vit(stem="conv-pool", patch_size=4, pool="mean").eval()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[0, :, 5, 5] += 10.0  # pixel (5, 5) lies in the token at grid cell (1, 1)
    with torch.no_grad():
        delta = (model.patch_embedding(changed) - model.patch_embedding(images)).abs().sum(-1)[0].reshape(8, 8)  # (G, G)
    assert delta[1, 1] > 0
    assert delta[4:, 4:].abs().max() == 0  # far tokens are untouched


@pytest.mark.parametrize("stem", ["conv-pool", "conv-group"])
@pytest.mark.parametrize("hidden_size", [4, 12, 16])
def test_narrow_conv_stems_still_end_at_the_token_width(stem, hidden_size):
    """The 16-channel floor of the early conv layers must not leak into the last one (it did: a crash at the first step)."""
    model = tiny_vit(stem=stem, hidden_size=hidden_size, num_heads=2, patch_size=8, pool="mean").eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_conv_group_stem_is_airbench_groups_widening_fourfold_from_identity_filters():
    from vitlab.models.aircnn import ConvGroup

    model = tiny_vit(stem="conv-group", patch_size=8, hidden_size=256, num_heads=4)
    groups = [m for m in model.patch_embedding.modules() if isinstance(m, ConvGroup)]
    assert [(g.conv1.in_channels, g.conv2.out_channels) for g in groups] == [(3, 16), (16, 64), (64, 256)]
    first = groups[1].conv1.weight  # (64, 16, 3, 3): the generic ViT init must not overwrite the identities
    torch.testing.assert_close(first[:16, :, 1, 1], torch.eye(16))
    assert first[:16].abs().sum() == 16 and first[16:].abs().sum() > 0


def test_attention_dropout_on_the_cpu_keeps_the_expected_output():
    """Dropping attention probabilities (scaled) leaves the mean output equal to the eval output."""
    torch.manual_seed(0)
    attention = Attention(ViTConfig(hidden_size=16, num_heads=2, attention_dropout=0.5))
    tokens = torch.randn(1, 5, 16)  # (B, T, D)
    with torch.no_grad():
        expected = attention.eval()(tokens)[0]
        attention.train()
        draws = torch.stack([attention(tokens)[0] for _ in range(4000)])  # (draws, B, T, D)
    assert not torch.allclose(draws[0], expected, atol=1e-3)  # it does drop
    assert torch.allclose(draws.mean(0), expected, atol=0.03)


def test_under_bf16_autocast_the_written_out_and_the_fused_kernels_give_close_logits(monkeypatch):
    model = tiny_vit(num_blocks=2).eval()
    nn.init.normal_(model.head.weight, std=0.5)  # a zero head would hide any difference
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        written_out = model(images).float()  # 65 tokens: the explicit bf16 path
        monkeypatch.setattr(layers, "CPU_EXPLICIT_MAX_TOKENS", 0)
        fused = model(images).float()  # the fused kernel in fp32
    assert not torch.equal(written_out, fused)  # two different kernels ran
    torch.testing.assert_close(written_out, fused, atol=0.05, rtol=0.05)


def fused_and_plain_gradients(monkeypatch, model, images):
    """(logits, gradients) of `model` under CPU bf16 autocast with the block's fused paths, then with them turned off."""
    import copy

    from vitlab.kernels import layer_norm as layer_norm_kernel
    from vitlab.models import activations, vit

    results, calls = [], []
    forward = layer_norm_kernel.residual_layer_norm_forward
    monkeypatch.setattr(layer_norm_kernel, "residual_layer_norm_forward", lambda *args: calls.append(args) or forward(*args))
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(vit.Attention, "projection_without_dropout", lambda self: False)
            monkeypatch.setattr(activations.MLP, "forward", nn.Sequential.forward)
            monkeypatch.setattr(vit.Block, "output_deferrable", lambda self, tokens: False)
        copied = copy.deepcopy(model)
        # plain: no block as one node either (that would run the fused paths' kernels whatever the patches above say)
        with torch.autocast("cpu", dtype=torch.bfloat16), nullcontext() if fused else blocks_as_separate_nodes():
            logits = copied(images)
        logits.float().square().sum().backward()
        calls.clear()
        # the residual norms, counted where the blocks call their kernels from Python (a block in one call into C runs
        # them inside it, the same bits: tests/models/test_fused_block.py)
        with torch.autocast("cpu", dtype=torch.bfloat16), blocks_from_python() if fused else blocks_as_separate_nodes():
            copied(images)
        results.append((logits.float(), {name: p.grad for name, p in copied.named_parameters()}, len(calls)))
        calls.clear()
    return results


def test_the_fused_residual_norms_biases_and_deferred_mlp_output_match_the_plain_blocks(monkeypatch):
    from vitlab.kernels import layer_norm as layer_norm_kernel

    torch.manual_seed(0)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=3)
    for parameter in model.parameters():
        if parameter.dim() == 1:
            nn.init.normal_(parameter, std=0.1)  # biases away from 0, so a lost or doubled bias shows
    nn.init.normal_(model.head.weight, std=0.5)
    (fused_logits, fused_grads, residual_norms), (plain_logits, plain_grads, plain_residual_norms) = fused_and_plain_gradients(
        monkeypatch, model, torch.randn(8, 3, 32, 32))
    if layer_norm_kernel.kernel_supports(torch.zeros(1, 64), torch.ones(64), torch.zeros(64)):
        # the first two blocks' MLP norms (the last block computes the CLS token alone), the 2nd and 3rd blocks' first norms
        assert (residual_norms, plain_residual_norms) == (2 + 2, 0)
    torch.testing.assert_close(fused_logits, plain_logits, rtol=0.02, atol=0.02)
    for name, expected in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], expected, rtol=0.02, atol=0.02 * expected.abs().max().item(), msg=name)


def test_the_block_keeps_the_projection_with_a_hook_or_active_dropout():
    model = build_model("vit", patch_size=8, hidden_size=32, num_heads=2, num_blocks=1, dropout=0.1)
    attention = model.blocks[0].attention
    assert not attention.projection_without_dropout()  # training, dropout 0.1 after the projection
    model.eval()
    assert attention.projection_without_dropout()
    seen = []
    handle = attention.projection.register_forward_hook(lambda module, inputs, output: seen.append(output))
    assert not attention.projection_without_dropout()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert len(seen) == 1  # the hook saw the projection run


def test_with_the_kernels_switched_off_the_block_computes_exactly_as_before(monkeypatch):
    """cpu_kernels false must give PyTorch's operators in their old order (the fused paths only where a kernel runs)."""
    from vitlab.kernels import switch_kernels

    torch.manual_seed(0)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=3)
    nn.init.normal_(model.head.weight, std=0.5)
    switch_kernels(False)
    try:
        (logits, grads, _), (plain_logits, plain_grads, _) = fused_and_plain_gradients(monkeypatch, model, torch.randn(4, 3, 32, 32))
    finally:
        switch_kernels(True)
    assert torch.equal(logits, plain_logits) and all(torch.equal(grads[name], plain_grads[name]) for name in plain_grads)


def test_monte_carlo_dropout_and_replaced_linear_layers_keep_their_own_forward():
    """The fused paths skip a module's forward only where it would do nothing else: a dropout switched back on in an
    evaluated model (Monte-Carlo dropout) still drops, and a Linear subclass with its own forward still runs it."""
    model = build_model("vit", patch_size=8, hidden_size=32, num_heads=2, num_blocks=2, dropout=0.5).eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    calls = []

    class Doubled(nn.Linear):
        def forward(self, x):
            calls.append(self)
            return 2 * super().forward(x)

    for block in model.blocks:
        for parent, name in ((block.attention, "projection"), (block.mlp, "0"), (block.mlp, "3")):
            replaced = Doubled(getattr(parent, name).in_features, getattr(parent, name).out_features)
            replaced.load_state_dict(getattr(parent, name).state_dict())
            setattr(parent, name, replaced)
    dropped = []
    model.blocks[0].attention.output_dropout.forward = lambda x: dropped.append(x) or x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 6 and len(dropped) == 1


@pytest.mark.parametrize("part", ["attention", "mlp", "block"])
def test_a_forward_replaced_on_an_attention_mlp_or_block_instance_runs_under_bf16_autocast(part):
    """The fused paths (the attention's mix, the MLP's deferred bias, a block's pending output) step aside for a
    forward set on the instance, as they do for hooks: the ablation changes the logits as it does in fp32."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig()).eval()
    nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(images).float()
    block = model.blocks[0]
    if part == "attention":
        block.attention.forward = lambda tokens, return_attention=False: (torch.zeros_like(tokens), None)
    elif part == "mlp":
        block.mlp.forward = lambda tokens: torch.zeros_like(tokens)
    else:
        block.forward = lambda tokens, return_attention=False, pending=None, defer_output=False: (tokens, None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(images).float()
    assert not torch.equal(before, after)


def test_under_bf16_autocast_the_cls_only_last_block_gives_the_full_blocks_logits_to_the_bit(monkeypatch):
    # With gradients on (the path that trains), where the CLS token's query goes through the linear layers' kernels.
    torch.manual_seed(8)
    model = tiny_vit(pool="cls", num_blocks=2, hidden_size=64, num_heads=4)
    nn.init.normal_(model.head.weight)
    images = torch.randn(16, 3, 32, 32)
    logits = []
    for cls_only in (True, False):
        monkeypatch.setattr(VisionTransformer, "reads_only_the_cls_token", lambda self, cls_only=cls_only: cls_only)
        with torch.autocast("cpu", torch.bfloat16):  # with gradients: the path that trains
            logits.append(model(images).detach())
    assert torch.equal(logits[0], logits[1])
