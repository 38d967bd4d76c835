"""The zoo's reference models: each builds, runs forward and backward, and has the structure and the
known answer at init that its docstring claims (checked against concrete values and known laws)."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import zoo
from gradprobe.errors import UsageError

# name → output shape of the main tensor for the catalogue inputs at batch 8
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (8, 10),
    "vgg_style": (8, 10),
    "resnet_style": (8, 10),
    "resnet50_style": (8, 1000),
    "transformer": (8, 32, 100),
    "lstm_classifier": (8, 5),
    "gru_classifier": (8, 5),
    "rezero_mlp": (8, 10),
    "zero_head_mlp": (8, 10),
    "identity_mlp": (8, 128),
    "shared_mlp": (8, 10),
    "dict_output": (8, 10),
    "dataclass_output": (8, 10),
    "frozen_mlp": (8, 10),
    "failing": (8, 10),
    "residual_mlp": (8, 10),
    "demo_model": (8, 10),
}

# ResNet-50 at 224×224 takes seconds per batch on CPU: it gets its own small test below.
RUNNABLE = [name for name in zoo.CATALOG if name not in ("failing", "resnet50_style")]


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output.logits


def _seed_log2_ratio(model: nn.Module, x: torch.Tensor) -> float:
    """log2 of the residual stream's second moment after all blocks, relative to the input's."""
    with torch.no_grad():
        stream = model[:-1](x)
    return math.log2(stream.pow(2).mean().item() / x.pow(2).mean().item())


# -- the catalogue ---------------------------------------------------------------------------------


def test_catalog_holds_every_builder_under_its_name() -> None:
    assert set(zoo.CATALOG) == set(EXPECTED_SHAPES)
    assert all(name == entry.name for name, entry in zoo.CATALOG.items())
    assert zoo.CATALOG["failing"].build is zoo.FailingNet
    assert zoo.CATALOG["resnet50_style"].build is zoo.resnet50_style
    with pytest.raises(dataclasses.FrozenInstanceError):
        zoo.CATALOG["mlp"].name = "other"  # type: ignore[misc]


def test_known_answers_as_built() -> None:
    untrainable = {name for name, entry in zoo.CATALOG.items() if not entry.trainable_as_built}
    assert untrainable == {"mlp", "failing", "residual_mlp", "demo_model"}


@pytest.mark.parametrize("name", RUNNABLE)
def test_forward_and_backward(name: str) -> None:
    model, inputs = zoo.example(name)
    output = _call(model, inputs)
    logits = _logits(output)
    assert tuple(logits.shape) == EXPECTED_SHAPES[name]
    assert torch.isfinite(logits).all()

    # A random projection, not a sum of squares: a zero head still gets a nonzero gradient.
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    loss = (logits * direction).sum()
    if getattr(output, "loss", None) is not None:
        loss = loss + output.loss
    loss.backward()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for parameter_name, parameter in trainable:
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)  # type: ignore[union-attr]
    for parameter_name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, parameter_name


def test_failing_net_raises_midway() -> None:
    model, inputs = zoo.example("failing")
    ran: list[str] = []
    model.body[0].register_forward_hook(lambda *_: ran.append("body.0"))
    model.body[2].register_forward_hook(lambda *_: ran.append("body.2"))
    model.broken.register_forward_pre_hook(lambda *_: ran.append("broken"))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _call(model, inputs)
    assert ran == ["body.0", "body.2", "broken"]


def test_example_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first_model, first_inputs = zoo.example("transformer")
    second_model, second_inputs = zoo.example("transformer")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first_inputs, second_inputs)
    for (name, a), (_, b) in zip(first_model.state_dict().items(), second_model.state_dict().items()):
        assert torch.equal(a, b), name
    other_model, other_inputs = zoo.example("transformer", seed=1)
    assert not torch.equal(other_inputs, first_inputs)
    assert not torch.equal(other_model.head.weight, first_model.head.weight)


def test_builders_are_deterministic_under_a_seeded_torch() -> None:
    torch.manual_seed(3)
    a = zoo.resnet_style()
    torch.manual_seed(3)
    b = zoo.resnet_style()
    assert torch.equal(a.layer3[1].conv2.weight, b.layer3[1].conv2.weight)
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_module_doctest_runs() -> None:
    result = doctest.testmod(zoo)
    assert result.attempted >= 2 and result.failed == 0


def test_example_rejects_unknown_name_listing_valid_ones() -> None:
    with pytest.raises(UsageError, match="unknown zoo model 'resnet18'") as caught:
        zoo.example("resnet18")
    assert "resnet50_style" in str(caught.value) and "demo_model" in str(caught.value)


def test_inputs_match_their_models() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = zoo.CATALOG["transformer"].make_inputs(4, generator)
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 32)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 100
    for name in ("lstm_classifier", "gru_classifier"):
        ids = zoo.CATALOG[name].make_inputs(4, generator)
        assert ids.dtype == torch.int64 and int(ids.max()) < 100
    assert zoo.CATALOG["vgg_style"].make_inputs(2, generator).shape == (2, 3, 32, 32)
    assert zoo.CATALOG["resnet50_style"].make_inputs(1, generator).shape == (1, 3, 224, 224)
    batch = zoo.CATALOG["dataclass_output"].make_inputs(4, generator)
    assert set(batch) == {"x", "labels"} and batch["labels"].dtype == torch.int64


# -- MLPs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", sorted(zoo.ACTIVATIONS))
def test_mlp_uses_the_named_activation(activation: str) -> None:
    model = zoo.mlp(depth=3, width=8, in_features=5, out_features=2, activation=activation)
    expected = type(zoo.ACTIVATIONS[activation]())
    assert [type(m) for m in model] == [nn.Linear, expected] * 3 + [nn.Linear]
    assert model[0].in_features == 5 and model[-1].out_features == 2


@pytest.mark.parametrize("norm,norm_type", [("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)])
def test_mlp_norm_sits_between_linear_and_activation(norm: str, norm_type: type[nn.Module]) -> None:
    model = zoo.mlp(depth=2, width=8, norm=norm, bias=False)
    assert [type(m) for m in model] == [nn.Linear, norm_type, nn.ReLU] * 2 + [nn.Linear]
    assert all(m.bias is None for m in model if isinstance(m, nn.Linear))


def test_mlp_rejects_unknown_names() -> None:
    with pytest.raises(UsageError, match="unknown activation 'swish'") as caught:
        zoo.mlp(activation="swish")
    assert "silu" in str(caught.value)
    with pytest.raises(UsageError, match="unknown norm 'group'"):
        zoo.mlp(norm="group")


def test_default_mlp_vanishes_as_built() -> None:
    # REFERENCE #2: PyTorch's default init shrinks the between-sample variance at every ReLU layer.
    model, _ = zoo.example("mlp")
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model[:-1](x)
    between_sample = hidden.var(dim=0).mean().item()
    assert between_sample < 1e-6 * x.var(dim=0).mean().item()
    unit = F.normalize(hidden, dim=1)
    assert (unit @ unit.T).mean().item() > 0.999


def test_demo_model_is_the_xavier_vs_he_textbook_case() -> None:
    model = zoo.demo_model()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 31 and sum(isinstance(m, nn.ReLU) for m in model) == 30
    assert all(m.bias is None and m.in_features == 256 for m in linears)
    xavier, he = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(0)
    for m in xavier:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    torch.manual_seed(0)
    for m in he:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        xavier_moment = xavier[:-1](x).pow(2).mean().item()
        he_moment = he[:-1](x).pow(2).mean().item()
    # Same draws, std ratio 1/√2 per layer, ReLU positively homogeneous: exactly 2^-30.
    assert math.log2(xavier_moment / he_moment) == pytest.approx(-30.0, abs=0.01)
    assert -4.0 < math.log2(he_moment) < 1.0  # He: ≈ 1/2, with finite-width spread (REFERENCE #6)


def test_frozen_mlp_freezes_exactly_the_first_two_linears() -> None:
    model = zoo.frozen_mlp()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 7
    flags = [(m.weight.requires_grad, m.bias.requires_grad) for m in linears]
    assert flags == [(False, False)] * 2 + [(True, True)] * 5


def test_zero_head_is_exactly_zero_and_the_body_is_he() -> None:
    model, inputs = zoo.example("zero_head_mlp")
    head = model[-1]
    assert torch.equal(head.weight, torch.zeros(10, 128))
    assert torch.equal(head.bias, torch.zeros(10))
    assert torch.equal(model(inputs), torch.zeros(8, 10))
    body = torch.cat([m.weight.flatten() for m in model[:-1] if isinstance(m, nn.Linear)])
    assert body.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.02)


def test_identity_mlp_is_the_identity() -> None:
    model, inputs = zoo.example("identity_mlp")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 8
    for linear in linears:
        assert torch.equal(linear.weight, torch.eye(128))
        assert torch.equal(linear.bias, torch.zeros(128))
    assert torch.equal(model(inputs), torch.relu(inputs))


def test_shared_mlp_calls_its_one_linear_six_times() -> None:
    model, inputs = zoo.example("shared_mlp")
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2
    assert sum(p.numel() for p in model.parameters()) == 64 * 64 + 64 + 64 * 10 + 10
    calls: list[tuple[int, ...]] = []
    model.shared.register_forward_hook(lambda _m, _i, out: calls.append(tuple(out.shape)))
    model(inputs)
    assert calls == [(8, 64)] * 6
    model(inputs)
    assert len(calls) == 12


# -- residual MLPs ---------------------------------------------------------------------------------


def test_rezero_gates_are_zero_and_the_blocks_are_identities() -> None:
    model, inputs = zoo.example("rezero_mlp")
    alphas = [m.alpha for m in model.modules() if isinstance(m, zoo.ReZeroBlock)]
    assert len(alphas) == 8
    assert all(a.shape == () and a.item() == 0.0 for a in alphas)
    output = model(inputs)
    assert torch.equal(output, model[-1](inputs))
    output.sum().backward()
    assert all(a.grad is not None and a.grad.abs().item() > 0 for a in alphas)
    branch = model[3].branch[0].weight.grad
    assert branch is not None and torch.count_nonzero(branch).item() == 0  # gated, not dead


def test_residual_mlp_variance_doubles_per_block() -> None:
    # REFERENCE #7: unnormalised He branches → 2^depth; averaged over seeds for finite-width spread.
    ratios = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = zoo.residual_mlp(depth=8, width=128)
        ratios.append(
            _seed_log2_ratio(model, torch.randn(512, 128, generator=torch.Generator().manual_seed(seed)))
        )
    assert sum(ratios) / len(ratios) == pytest.approx(8.0, abs=1.0)


def test_residual_mlp_with_batch_norm_grows_linearly() -> None:
    # Each BN-closed branch adds variance exactly 1: 1 + depth = 9 for unit-variance input.
    for seed in range(3):
        torch.manual_seed(seed)
        model = zoo.residual_mlp(depth=8, width=128, norm="batch")
        assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 16
        ratio = 2 ** _seed_log2_ratio(
            model, torch.randn(512, 128, generator=torch.Generator().manual_seed(seed))
        )
        assert 8.0 < ratio < 10.5


# -- convolutional nets ----------------------------------------------------------------------------


def test_vgg_style_layout() -> None:
    model = zoo.vgg_style(batch_norm=True)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert any(isinstance(m, nn.Dropout) for m in model.classifier)
    assert model.classifier[0].in_features == 64 * 4 * 4


def test_resnet_blocks_use_inplace_relu_and_inplace_add() -> None:
    model = zoo.resnet_style()
    blocks = [m for m in model.modules() if isinstance(m, zoo.BasicBlock)]
    assert len(blocks) == 6
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 7 and all(r.inplace for r in relus)
    assert all(b.relu.inplace for b in blocks)
    # `out += identity` modifies bn2's output in place: exactly what breaks a full backward hook.
    blocks[0].bn2.register_full_backward_hook(lambda *_: None)
    with pytest.raises(RuntimeError, match="modified inplace"):
        model(torch.randn(2, 3, 32, 32))


def test_resnet_downsample_and_kaiming_fan_out_init() -> None:
    model = zoo.resnet_style()
    assert model.layer1[0].downsample is None
    shortcut = model.layer2[0].downsample
    assert shortcut is not None and shortcut[0].kernel_size == (1, 1) and shortcut[0].stride == (2, 2)
    assert isinstance(shortcut[1], nn.BatchNorm2d)
    conv = model.layer3[1].conv2  # 64 → 64, 3×3: fan_out = 64·9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert conv.weight.mean().abs().item() < 0.002


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_zeroes_exactly_the_last_bn_of_each_block(zero_init: bool) -> None:
    model = zoo.resnet_style(zero_init_residual=zero_init)
    last = {id(m.bn2) for m in model.modules() if isinstance(m, zoo.BasicBlock)}
    assert len(last) == 6
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 6 * 2 + 2  # stem, two per block, two downsample shortcuts
    for bn in norms:
        expected = 0.0 if zero_init and id(bn) in last else 1.0
        assert torch.equal(bn.weight, torch.full_like(bn.weight, expected))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_resnet50_has_the_published_parameter_count() -> None:
    model = zoo.resnet50_style()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    blocks = [m for m in model.modules() if isinstance(m, zoo.Bottleneck)]
    assert len(blocks) == 16
    assert all(b.conv2.stride == (2, 2) for b in (model.layer2[0], model.layer3[0], model.layer4[0]))
    assert model.layer2[0].conv1.stride == (1, 1)  # v1.5: the stride is on the 3×3
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    output = model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert output.shape == (1, 1000) and torch.isfinite(output).all()


# -- sequence models -------------------------------------------------------------------------------


def _captured_masks(model: zoo.TransformerLM, tokens: torch.Tensor) -> list[Any]:
    masks: list[Any] = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(
            lambda _m, _args, kwargs: masks.append(kwargs.get("attn_mask")), with_kwargs=True
        )
    model(tokens)
    return masks


def test_transformer_passes_a_float_minus_inf_causal_mask() -> None:
    model, tokens = zoo.example("transformer")
    masks = _captured_masks(model, tokens)
    assert len(masks) == 2
    above = torch.ones(32, 32, dtype=torch.bool).triu(1)
    for mask in masks:
        assert mask.dtype == torch.float32 and mask.shape == (32, 32)
        assert torch.isneginf(mask[above]).all()
        assert torch.equal(mask[~above], torch.zeros(int((~above).sum())))


def test_transformer_is_causal() -> None:
    model, tokens = zoo.example("transformer")
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert (before[:, :-1] - after[:, :-1]).abs().max().item() <= 1e-6
    assert (before[:, -1] - after[:, -1]).abs().max().item() > 1e-3


def test_transformer_without_causal_mask() -> None:
    model = zoo.transformer(causal=False)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _captured_masks(model, tokens) == [None, None]


def test_transformer_layout() -> None:
    model = zoo.transformer()
    assert isinstance(model.position_embedding, nn.Parameter)
    assert model.position_embedding.shape == (1, 64, 64)
    assert all(b.attn.batch_first and b.attn.num_heads == 4 for b in model.blocks)
    assert [type(m) for m in model.blocks[0].mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert model.blocks[0].mlp[0].out_features == 256
    assert not any(isinstance(m, zoo.LayerScale) for m in model.modules())
    with pytest.raises(ValueError, match="exceeds max_len 64"):
        model(torch.zeros(1, 65, dtype=torch.int64))


def test_layer_scale_starts_at_the_requested_value() -> None:
    model = zoo.transformer(layer_scale=1e-6)
    scales = [m.scale for m in model.modules() if isinstance(m, zoo.LayerScale)]
    assert len(scales) == 4  # attention and MLP branch of each of the 2 blocks
    for scale in scales:
        assert torch.equal(scale, torch.full((64,), 1e-6))
        assert scale.requires_grad


@pytest.mark.parametrize("name,rnn_type", [("lstm_classifier", nn.LSTM), ("gru_classifier", nn.GRU)])
def test_recurrent_classifiers_return_the_rnn_tuples(name: str, rnn_type: type[nn.Module]) -> None:
    model, tokens = zoo.example(name)
    assert type(model.rnn) is rnn_type and model.rnn.batch_first and model.rnn.num_layers == 2
    outputs: list[Any] = []
    model.rnn.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    logits = model(tokens)
    out, state = outputs[0]
    assert out.shape == (8, 12, 64)
    if rnn_type is nn.LSTM:
        h, c = state
        assert h.shape == c.shape == (2, 8, 64)
    else:
        assert state.shape == (2, 8, 64)
    assert torch.equal(logits, model.fc(out[:, -1]))


# -- output containers -----------------------------------------------------------------------------


def test_dict_output_net() -> None:
    model, x = zoo.example("dict_output")
    output = model(x)
    assert set(output) == {"logits", "hidden"}
    assert output["hidden"].shape == (8, 64)
    assert torch.equal(output["logits"], model.head(output["hidden"]))


def test_dataclass_output_net() -> None:
    model, batch = zoo.example("dataclass_output")
    output = model(**batch)
    assert dataclasses.is_dataclass(output)
    assert [f.name for f in dataclasses.fields(output)] == ["loss", "logits", "hidden_states"]
    assert output.loss is not None and output.loss.shape == ()
    assert output.loss.item() == pytest.approx(
        F.cross_entropy(output.logits, batch["labels"]).item(), abs=1e-6
    )
    assert [h.shape for h in output.hidden_states] == [(8, 64), (8, 64)]
    assert model(batch["x"]).loss is None
