"""Initializers: parsing, the laws each one must satisfy (fixed seeds, large tensors), fans by hand."""

from __future__ import annotations

import dataclasses
import doctest
import math

import pytest
import torch
from torch import nn

import gradprobe.initializers as gi
from gradprobe.errors import UsageError
from gradprobe.initializers import (
    ALIASES,
    INITIALIZERS,
    Initializer,
    InitPlan,
    fans,
    register_initializer,
    resolve_initializer,
)

EXPECTED_NAMES = [
    "keep",
    "default",
    "zeros",
    "constant",
    "uniform",
    "normal",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
    "orthogonal",
    "sparse",
]
# initializers that write the weights (all but keep and default)
WRITING = EXPECTED_NAMES[2:]
RANDOM = ["uniform", "normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
          "lecun_normal", "orthogonal", "sparse"]  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_variance(w: torch.Tensor, expected: float, fourth_moment_ratio: float = 3.0) -> None:
    """Sample variance (about 0) within 6 standard errors of ``expected``.

    The standard error of the mean of w² is sqrt((E[w⁴] − E[w²]²)/n) = Var·sqrt((κ − 1)/n), with
    κ = E[w⁴]/E[w²]² (3 for a normal, 9/5 for a uniform).
    """
    x = w.detach().double().flatten()
    n = x.numel()
    measured = (x * x).mean().item()
    tolerance = 6 * expected * math.sqrt((fourth_moment_ratio - 1) / n)
    assert abs(measured - expected) < tolerance, (measured, expected, tolerance)


# --------------------------------------------------------------------------------------------
# Registry and parsing
# --------------------------------------------------------------------------------------------


def test_registry_order_and_names():
    assert list(INITIALIZERS)[: len(EXPECTED_NAMES)] == EXPECTED_NAMES
    for name, cls in INITIALIZERS.items():
        assert cls.name == name
        assert cls.summary and "\n" not in cls.summary
        assert cls.formula and "\n" not in cls.formula


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_name_resolves_with_defaults(name):
    init = resolve_initializer(name)
    assert type(init) is INITIALIZERS[name]
    assert init.describe() == name
    assert resolve_initializer(init.spec()) == init
    assert resolve_initializer(f"  {name.upper()}:  ") == init  # spacing, case, empty option list


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("constant", gi.Constant(value=0.1)),
        ("constant:value=-2", gi.Constant(value=-2.0)),
        ("uniform", gi.Uniform(a=-0.05, b=0.05)),
        ("uniform:a=-1,b=3", gi.Uniform(a=-1.0, b=3.0)),
        ("normal", gi.Normal(mean=0.0, std=0.01)),
        ("normal:mean=1,std=2e-2", gi.Normal(mean=1.0, std=0.02)),
        ("xavier_uniform:gain=2", gi.XavierUniform(gain=2.0)),
        ("xavier_normal:gain=auto", gi.XavierNormal(gain="auto")),
        ("kaiming_uniform:mode=fan_out", gi.KaimingUniform(mode="fan_out")),
        ("kaiming_normal:nonlinearity=tanh", gi.KaimingNormal(nonlinearity="tanh")),
        ("kaiming_normal:nonlinearity=leaky_relu,a=0.2", gi.KaimingNormal(nonlinearity="leaky_relu", a=0.2)),
        ("lecun_normal:gain=auto", gi.LecunNormal(gain="auto")),
        ("orthogonal:gain=1.5", gi.Orthogonal(gain=1.5)),
        ("sparse:sparsity=0.5,std=0.1", gi.Sparse(sparsity=0.5, std=0.1)),
        ("he_normal", gi.KaimingNormal()),
        ("he_uniform:mode=fan_out", gi.KaimingUniform(mode="fan_out")),
        ("glorot_normal", gi.XavierNormal()),
        ("glorot_uniform", gi.XavierUniform()),
    ],
)
def test_options_parse(spec, expected):
    init = resolve_initializer(spec)
    assert init == expected
    assert resolve_initializer(init.spec()) == init  # the canonical spec round-trips


def test_defaults_are_the_contract():
    assert gi.Constant().value == 0.1
    assert (gi.Uniform().a, gi.Uniform().b) == (-0.05, 0.05)
    assert (gi.Normal().mean, gi.Normal().std) == (0.0, 0.01)
    assert gi.XavierNormal().gain == gi.XavierUniform().gain == 1.0
    kaiming = gi.KaimingNormal()
    assert (kaiming.mode, kaiming.nonlinearity, kaiming.a) == ("fan_in", "auto", 0.0)
    assert gi.LecunNormal().gain == gi.Orthogonal().gain == 1.0
    assert (gi.Sparse().sparsity, gi.Sparse().std) == (0.1, 0.01)
    assert set(ALIASES) == {"he_normal", "he_uniform", "glorot_normal", "glorot_uniform"}


def test_describe_shows_changed_options_only():
    assert resolve_initializer("normal:std=0.02").describe() == "normal(std=0.02)"
    assert resolve_initializer("he_normal:mode=fan_out").describe() == "kaiming_normal(mode=fan_out)"
    assert resolve_initializer("xavier_normal:gain=auto").spec() == "xavier_normal:gain=auto"


def test_instances_pass_through():
    init = gi.Normal(std=0.5)
    assert resolve_initializer(init) is init


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("xavier", ["'xavier'", "keep, default, zeros", "sparse", "he_normal"]),
        ("", ["''", "kaiming_normal"]),
        ("normal:sd=1", ["'sd'", "valid: mean, std"]),
        ("keep:gain=1", ["'gain'", "none"]),
        ("normal:std=-1", ["std", "-1"]),
        ("normal:std=abc", ["std", "'abc'"]),
        ("normal:std=True", ["std", "True"]),
        ("normal:std=nan", ["std", "nan"]),
        ("normal:std", ["'std'", "key=value"]),
        ("normal:std=1,std=2", ["'std'", "twice"]),
        ("uniform:a=1,b=0", ["b", "0"]),
        ("kaiming_normal:mode=fan_avg", ["'fan_avg'", "fan_in, fan_out"]),
        ("kaiming_normal:nonlinearity=swish", ["'swish'", "auto, linear", "relu", "selu"]),
        ("kaiming_normal:a=0.1", ["a", "leaky_relu"]),
        ("xavier_normal:gain=big", ["gain", "'big'", "auto"]),
        ("sparse:sparsity=1.5", ["sparsity", "1.5"]),
    ],
)
def test_bad_specs_name_the_value_and_the_choices(spec, fragments):
    with pytest.raises(UsageError) as info:
        resolve_initializer(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_type_and_direct_construction_are_checked():
    with pytest.raises(UsageError):
        resolve_initializer(3)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        gi.Normal(std=-0.1)
    with pytest.raises(UsageError):
        gi.KaimingNormal(mode="fan_avg")


def test_register_initializer_extends_the_registry():
    @dataclasses.dataclass(frozen=True)
    class Halves(Initializer):
        scale: float = 0.5

        name = "test_halves"
        summary = "every weight = scale"
        formula = "W = scale"

        def init_weight_(self, weight, fan_in, fan_out, *, gain, generator):
            return gi.constant_(weight, self.scale)

    try:
        assert register_initializer(Halves) is Halves
        init = resolve_initializer("test_halves:scale=0.25")
        layer = nn.Linear(3, 2)
        assert init.init_module_(layer, gain=1.0, generator=gen())
        assert torch.all(layer.weight == 0.25) and torch.all(layer.bias == 0)
        assert list(INITIALIZERS)[-1] == "test_halves"

        @dataclasses.dataclass(frozen=True)
        class Clash(Initializer):
            name = "normal"

        with pytest.raises(ValueError, match="already taken"):
            register_initializer(Clash)
    finally:
        INITIALIZERS.pop("test_halves", None)


# --------------------------------------------------------------------------------------------
# Statistical laws of the tensor functions (fixed seeds, 10⁶ draws)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gain", [1.0, 5 / 3])
def test_xavier_normal_variance(gain):
    w = gi.xavier_normal_(torch.empty(1000, 1000), 400, 1600, gain, generator=gen())
    assert_variance(w, gain**2 * 2 / (400 + 1600))
    assert abs(w.mean().item()) < 6 * gain * math.sqrt(2 / 2000) / 1000


def test_xavier_uniform_bound_and_variance():
    gain = 1.3
    w = gi.xavier_uniform_(torch.empty(1000, 1000), 300, 900, gain, generator=gen())
    bound = gain * math.sqrt(6 / 1200)
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.999 * bound
    assert_variance(w, gain**2 * 2 / 1200, fourth_moment_ratio=9 / 5)


@pytest.mark.parametrize(("mode", "fan"), [("fan_in", 250), ("fan_out", 1000)])
def test_kaiming_normal_variance(mode, fan):
    w = gi.kaiming_normal_(torch.empty(1000, 1000), 250, 1000, math.sqrt(2), mode=mode, generator=gen())
    assert_variance(w, 2 / fan)


@pytest.mark.parametrize(("mode", "fan"), [("fan_in", 250), ("fan_out", 1000)])
def test_kaiming_uniform_bound_and_variance(mode, fan):
    gain = 5 / 3
    w = gi.kaiming_uniform_(torch.empty(1000, 1000), 250, 1000, gain, mode=mode, generator=gen())
    bound = gain * math.sqrt(3 / fan)
    assert bound * 0.999 < w.abs().max().item() <= bound
    assert_variance(w, gain**2 / fan, fourth_moment_ratio=9 / 5)


def test_uniform_bounds_and_variance():
    w = gi.uniform_(torch.empty(1000, 1000), -0.05, 0.05, generator=gen())
    assert -0.05 <= w.min().item() < -0.0499 and 0.0499 < w.max().item() <= 0.05
    assert_variance(w, 0.1**2 / 12, fourth_moment_ratio=9 / 5)
    shifted = gi.uniform_(torch.empty(1000, 1000), 1.0, 3.0, generator=gen())
    assert 1.0 <= shifted.min().item() and shifted.max().item() <= 3.0
    assert abs(shifted.mean().item() - 2.0) < 6 * math.sqrt(4 / 12 / 1e6)
    assert_variance(shifted - 2.0, 4 / 12, fourth_moment_ratio=9 / 5)


def test_normal_mean_and_variance():
    w = gi.normal_(torch.empty(1000, 1000), 0.5, 0.01, generator=gen())
    assert abs(w.mean().item() - 0.5) < 6 * 0.01 / 1000
    assert_variance(w - 0.5, 0.01**2)


def test_lecun_normal_variance():
    w = gi.lecun_normal_(torch.empty(1000, 1000), 333, generator=gen())
    assert_variance(w, 1 / 333)
    w = gi.lecun_normal_(torch.empty(1000, 1000), 333, 2.0, generator=gen())
    assert_variance(w, 4 / 333)


@pytest.mark.parametrize("shape", [(256, 256), (512, 128), (128, 512), (64, 8, 3, 3), (8, 16, 3, 3)])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal_is_orthogonal(shape, gain):
    w = gi.orthogonal_(torch.empty(shape), gain, generator=gen()).reshape(shape[0], -1).double()
    rows, cols = w.shape
    gram = w.T @ w if rows >= cols else w @ w.T
    assert torch.allclose(gram, gain**2 * torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-5)


def test_orthogonal_is_haar_distributed():
    # Under the Haar measure on O(n), trace(Q) has mean 0 and variance 1 for every n. The raw Q of
    # a Householder QR (no sign correction) is biased towards a negative diagonal: trace ≈ −12 at n = 400.
    for seed in range(3):
        w = gi.orthogonal_(torch.empty(400, 400), generator=gen(seed))
        assert abs(torch.trace(w.double()).item()) < 4.5
        assert 0.4 < (torch.diagonal(w) > 0).float().mean().item() < 0.6


def test_orthogonal_rejects_vectors():
    with pytest.raises(ValueError, match="2 dimensions"):
        gi.orthogonal_(torch.empty(5), generator=gen())


@pytest.mark.parametrize(
    ("shape", "sparsity", "zeros"),
    [
        ((1000, 500), 0.1, 100),
        ((100, 2000), 0.07, 7),  # 0.07·100 is 7.000000000000001 in floating point: 7 zeros, not 8
        ((40, 6, 3, 3), 0.25, 10),
        ((30, 600), 0.05, 2),  # ⌈1.5⌉
    ],
)
def test_sparse_zeros_per_column(shape, sparsity, zeros):
    w = gi.sparse_(torch.empty(shape), sparsity, 0.02, generator=gen())
    columns = w.reshape(shape[0], -1)
    zeros_per_column = (columns == 0).sum(dim=0)
    assert torch.all(zeros_per_column == zeros)
    assert_variance(columns[columns != 0], 0.02**2)
    # the zeros fall on different rows in different columns
    assert (columns == 0).any(dim=1).float().mean().item() > 0.9


def test_sparse_extremes():
    assert torch.all(gi.sparse_(torch.ones(20, 30), 1.0, generator=gen()) == 0)
    assert torch.all(gi.sparse_(torch.zeros(20, 30), 0.0, 1.0, generator=gen()) != 0)


def test_tensor_functions_are_in_place_and_return_the_tensor():
    t = torch.empty(4, 6)
    assert gi.normal_(t, 0, 1, generator=gen()) is t
    assert gi.orthogonal_(t, generator=gen()) is t
    assert gi.zeros_(t) is t and torch.all(t == 0)
    assert gi.constant_(t, 3.0) is t and torch.all(t == 3)


@pytest.mark.parametrize(
    "fill",
    [
        lambda t, g: gi.uniform_(t, -1, 1, generator=g),
        lambda t, g: gi.normal_(t, 0, 1, generator=g),
        lambda t, g: gi.xavier_normal_(t, 30, 20, generator=g),
        lambda t, g: gi.xavier_uniform_(t, 30, 20, generator=g),
        lambda t, g: gi.kaiming_normal_(t, 30, 20, generator=g),
        lambda t, g: gi.kaiming_uniform_(t, 30, 20, generator=g),
        lambda t, g: gi.lecun_normal_(t, 30, generator=g),
        lambda t, g: gi.orthogonal_(t, generator=g),
        lambda t, g: gi.sparse_(t, 0.2, 1.0, generator=g),
    ],
)
def test_bitwise_determinism_and_dtype_independence(fill):
    a = fill(torch.empty(20, 30), gen(7))
    b = fill(torch.empty(20, 30), gen(7))
    c = fill(torch.empty(20, 30), gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    bf16 = fill(torch.empty(20, 30, dtype=torch.bfloat16), gen(7))
    assert torch.equal(bf16, a.to(torch.bfloat16))
    f64 = fill(torch.empty(20, 30, dtype=torch.float64), gen(7))
    assert torch.equal(f64.float(), a)


# --------------------------------------------------------------------------------------------
# Fans, computed by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "param", "expected"),
    [
        (nn.Linear(20, 30), "weight", (20, 30)),
        (nn.Bilinear(4, 5, 6), "weight", (20, 6)),
        (nn.Conv2d(16, 32, 3), "weight", (16 * 9, 32 * 9)),
        (nn.Conv2d(16, 32, 3, groups=4), "weight", (4 * 9, 8 * 9)),  # PyTorch: (36, 288)
        (nn.Conv2d(8, 16, 5, groups=8), "weight", (1 * 25, 2 * 25)),  # depthwise, multiplier 2
        (nn.ConvTranspose2d(16, 32, (3, 5), groups=4), "weight", (4 * 15, 8 * 15)),  # PyTorch: (120, 240)
        (nn.ConvTranspose2d(12, 6, 4, stride=2), "weight", (12 * 16, 6 * 16)),  # PyTorch: (96, 192)
        (nn.Conv1d(6, 10, 5), "weight", (30, 50)),
        (nn.Conv3d(4, 6, (2, 3, 4)), "weight", (4 * 24, 6 * 24)),
        (nn.ConvTranspose1d(6, 9, 3, groups=3), "weight", (2 * 3, 3 * 3)),
        (nn.ConvTranspose3d(4, 2, 2), "weight", (4 * 8, 2 * 8)),
        (nn.Embedding(100, 32), "weight", (1, 1)),
        (nn.EmbeddingBag(100, 32), "weight", (1, 1)),
        (nn.MultiheadAttention(24, 4), "in_proj_weight", (24, 24)),
        (nn.MultiheadAttention(24, 4, kdim=10, vdim=14), "q_proj_weight", (24, 24)),
        (nn.MultiheadAttention(24, 4, kdim=10, vdim=14), "k_proj_weight", (10, 24)),
        (nn.MultiheadAttention(24, 4, kdim=10, vdim=14), "v_proj_weight", (14, 24)),
        (nn.RNNCell(7, 11), "weight_ih", (7, 11)),
        (nn.LSTMCell(7, 11), "weight_hh", (11, 11)),
        (nn.GRUCell(7, 11), "weight_ih", (7, 11)),
    ],
)
def test_fans_by_hand(module, param, expected):
    assert fans(module, param) == expected


def test_fans_multilayer_bidirectional_lstm_with_projection():
    # input 7, hidden 20, proj 5, 2 directions: layer 1 reads 2·5 = 10, h has width 5
    lstm = nn.LSTM(7, 20, num_layers=3, bidirectional=True, proj_size=5)
    for suffix in ("", "_reverse"):
        assert fans(lstm, f"weight_ih_l0{suffix}") == (7, 20)
        assert fans(lstm, f"weight_ih_l1{suffix}") == (10, 20)
        assert fans(lstm, f"weight_ih_l2{suffix}") == (10, 20)
        for k in range(3):
            assert fans(lstm, f"weight_hh_l{k}{suffix}") == (5, 20)
            assert fans(lstm, f"weight_hr_l{k}{suffix}") == (20, 5)


def test_fans_multilayer_bidirectional_gru_and_rnn():
    gru = nn.GRU(7, 12, num_layers=3, bidirectional=True)
    assert fans(gru, "weight_ih_l0") == (7, 12)
    assert fans(gru, "weight_ih_l2_reverse") == (24, 12)
    assert fans(gru, "weight_hh_l1") == (12, 12)
    rnn = nn.RNN(5, 9, num_layers=2, nonlinearity="relu")
    assert fans(rnn, "weight_ih_l1") == (9, 9)


def test_fans_rejects_biases_and_unknown_modules():
    with pytest.raises(UsageError, match="valid: weight"):
        fans(nn.Linear(2, 3), "bias")
    with pytest.raises(UsageError, match="valid: weight"):
        fans(nn.Linear(2, 3), "nope")
    with pytest.raises(UsageError, match="PReLU"):
        fans(nn.PReLU(), "weight")


def test_grouped_conv_kaiming_fan_out_uses_the_per_group_fan():
    conv = nn.Conv2d(64, 128, 3, groups=8)  # fan_out = (128/8)·9 = 144, PyTorch would say 1152
    gi.KaimingNormal(mode="fan_out", nonlinearity="relu").init_module_(conv, gain=1.0, generator=gen())
    assert_variance(conv.weight, 2 / 144)


def test_embedding_gets_unit_variance_under_variance_preserving_inits():
    for spec in ("xavier_normal", "kaiming_normal", "lecun_normal"):
        emb = nn.Embedding(2000, 500)
        resolve_initializer(spec).init_module_(emb, gain=1.0, generator=gen())
        assert_variance(emb.weight, 1.0)


# --------------------------------------------------------------------------------------------
# Module handling
# --------------------------------------------------------------------------------------------


def scramble_(module: nn.Module) -> nn.Module:
    """Fill every parameter with nonzero noise so that a test of 0 or 1 can fail."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(3.0, 1.0, generator=gen(99))
    return module


def test_lstm_each_gate_chunk_is_orthogonal():
    lstm = nn.LSTM(16, 32, num_layers=2, bidirectional=True)
    assert gi.Orthogonal().init_module_(lstm, gain=1.0, generator=gen())
    for name in ("weight_hh_l0", "weight_ih_l0", "weight_ih_l1_reverse", "weight_hh_l1"):
        w = getattr(lstm, name).detach().double()
        chunks = w.split(32)
        assert len(chunks) == 4
        for chunk in chunks:  # (32, 16) tall, (32, 32) square or (32, 64) wide
            gram = chunk.T @ chunk if chunk.shape[0] >= chunk.shape[1] else chunk @ chunk.T
            assert torch.allclose(gram, torch.eye(min(chunk.shape), dtype=torch.float64), atol=1e-5)
        # and the gates are not the same matrix
        assert not torch.allclose(chunks[0], chunks[1])


def test_gru_kaiming_per_gate_uses_the_layer_input_width():
    gru = nn.GRU(300, 400, num_layers=2, bidirectional=True)
    gi.KaimingNormal(nonlinearity="tanh").init_module_(gru, gain=1.0, generator=gen())
    assert_variance(gru.weight_ih_l0, (5 / 3) ** 2 / 300)
    assert_variance(gru.weight_ih_l1, (5 / 3) ** 2 / 800)
    assert_variance(gru.weight_hh_l1_reverse, (5 / 3) ** 2 / 400)
    assert torch.all(gru.bias_ih_l1 == 0) and torch.all(gru.bias_hh_l0_reverse == 0)


def test_cells_per_gate_and_zero_biases():
    cell = scramble_(nn.LSTMCell(12, 24))
    assert gi.Orthogonal(gain=2.0).init_module_(cell, gain=1.0, generator=gen())
    for chunk in cell.weight_ih.detach().double().split(24):  # (24, 12): tall
        assert torch.allclose(chunk.T @ chunk, 4 * torch.eye(12, dtype=torch.float64), atol=1e-5)
    assert torch.all(cell.bias_ih == 0) and torch.all(cell.bias_hh == 0)


def test_attention_packed_chunks_and_biases():
    mha = scramble_(nn.MultiheadAttention(32, 4, add_bias_kv=True))
    out_proj_before = mha.out_proj.weight.clone()
    assert gi.Orthogonal().init_module_(mha, gain=1.0, generator=gen())
    chunks = mha.in_proj_weight.detach().double().split(32)
    for chunk in chunks:
        assert torch.allclose(chunk.T @ chunk, torch.eye(32, dtype=torch.float64), atol=1e-5)
    assert torch.all(mha.in_proj_bias == 0)
    assert torch.all(mha.bias_k == 0) and torch.all(mha.bias_v == 0)
    # out_proj is a child Linear: untouched until its own module is visited
    assert torch.equal(mha.out_proj.weight, out_proj_before)


def test_attention_separate_projections_use_kdim_vdim():
    mha = nn.MultiheadAttention(200, 4, kdim=100, vdim=400)
    gi.XavierNormal().init_module_(mha, gain=1.0, generator=gen())
    assert_variance(mha.q_proj_weight, 2 / 400)
    assert_variance(mha.k_proj_weight, 2 / 300)
    assert_variance(mha.v_proj_weight, 2 / 600)


@pytest.mark.parametrize("name", WRITING)
@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_padding_row_stays_zero(name, cls):
    emb = scramble_(cls(50, 8, padding_idx=3))
    assert resolve_initializer(name).init_module_(emb, gain=1.0, generator=gen())
    assert torch.all(emb.weight[3] == 0)
    if name != "zeros":
        assert emb.weight[4].abs().sum() > 0


NORMS = [nn.BatchNorm1d(6), nn.BatchNorm2d(6), nn.BatchNorm3d(6), nn.LayerNorm(6), nn.GroupNorm(2, 6),
         nn.InstanceNorm2d(6, affine=True)] + ([nn.RMSNorm(6)] if hasattr(nn, "RMSNorm") else [])  # fmt: skip


@pytest.mark.parametrize("name", WRITING)
@pytest.mark.parametrize("norm", NORMS, ids=lambda m: type(m).__name__)
def test_norm_layers_get_weight_one_bias_zero(name, norm):
    scramble_(norm)
    assert resolve_initializer(name).init_module_(norm, gain=3.0, generator=gen())
    assert torch.all(norm.weight == 1)
    if getattr(norm, "bias", None) is not None:
        assert torch.all(norm.bias == 0)


LAYERS = [
    lambda: nn.Linear(6, 4),
    lambda: nn.Bilinear(3, 4, 5),
    lambda: nn.Conv1d(4, 6, 3),
    lambda: nn.Conv2d(4, 8, 3, groups=2),
    lambda: nn.Conv3d(2, 4, 2),
    lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True),
    lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3),
    lambda: nn.GRU(4, 6),
    lambda: nn.RNN(4, 6),
    lambda: nn.GRUCell(4, 6),
]


@pytest.mark.parametrize("make", LAYERS, ids=lambda f: type(f()).__name__)
def test_constant_sets_weights_and_zeroes_biases(make):
    layer = scramble_(make())
    assert gi.Constant(value=0.25).init_module_(layer, gain=2.0, generator=gen())
    for name, p in layer.named_parameters(recurse=False):
        expected = 0.0 if "bias" in name else 0.25
        assert torch.all(p == expected), name


@pytest.mark.parametrize("name", RANDOM)
@pytest.mark.parametrize("make", LAYERS, ids=lambda f: type(f()).__name__)
def test_random_inits_zero_biases_and_are_deterministic(make, name):
    init = resolve_initializer(name)
    a, b = scramble_(make()), scramble_(make())
    assert init.init_module_(a, gain=1.0, generator=gen(5))
    assert init.init_module_(b, gain=1.0, generator=gen(5))
    for (pname, pa), pb in zip(a.named_parameters(recurse=False), b.parameters(recurse=False)):
        assert torch.equal(pa, pb), pname
        if "bias" in pname:
            assert torch.all(pa == 0), pname
        else:
            assert pa.abs().max() > 0, pname


@pytest.mark.parametrize("name", WRITING)
def test_bf16_parameters_match_float32_cast(name):
    init = resolve_initializer(name)
    for make in (lambda: nn.Linear(40, 30), lambda: nn.LSTM(8, 12), lambda: nn.Conv2d(4, 8, 3)):
        full, half = make(), make().to(torch.bfloat16)
        init.init_module_(full, gain=1.0, generator=gen(3))
        init.init_module_(half, gain=1.0, generator=gen(3))
        for p32, p16 in zip(full.parameters(), half.parameters()):
            assert p16.dtype == torch.bfloat16
            assert torch.equal(p16, p32.detach().to(torch.bfloat16))


def test_initialised_parameters_stay_leaves_without_history():
    layer = nn.Linear(5, 5)
    gi.KaimingNormal().init_module_(layer, gain=1.0, generator=gen())
    assert layer.weight.is_leaf and layer.weight.grad_fn is None and layer.weight.requires_grad


# --------------------------------------------------------------------------------------------
# Gains
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "variance", "uses_caller_gain"),
    [
        ("xavier_normal:gain=auto", 9 * 2 / 800, True),
        ("xavier_normal", 2 / 800, False),  # Glorot & Bengio: gain 1, whatever follows
        ("xavier_normal:gain=2", 4 * 2 / 800, False),
        ("lecun_normal:gain=auto", 9 / 400, True),
        ("lecun_normal", 1 / 400, False),
        ("kaiming_normal", 9 / 400, True),  # nonlinearity=auto
    ],
)
def test_gain_auto_uses_the_callers_gain_and_a_number_ignores_it(spec, variance, uses_caller_gain):
    layer = nn.Linear(400, 400)
    init = resolve_initializer(spec)
    assert init.uses_caller_gain is uses_caller_gain
    init.init_module_(layer, gain=3.0, generator=gen())
    assert_variance(layer.weight, variance)


def test_orthogonal_gain_auto():
    layer = nn.Linear(64, 64)
    gi.Orthogonal(gain="auto").init_module_(layer, gain=1.5, generator=gen())
    w = layer.weight.detach().double()
    assert torch.allclose(w.T @ w, 2.25 * torch.eye(64, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize(
    ("nonlinearity", "gain"),
    [
        ("relu", math.sqrt(2)),
        ("tanh", 5 / 3),
        ("linear", 1.0),
        ("sigmoid", 1.0),
        ("selu", 1.0),  # not calculate_gain's 3/4: LeCun normal is the SELU fixed point
    ],
)
def test_kaiming_named_nonlinearity_ignores_the_callers_gain(nonlinearity, gain):
    init = gi.KaimingNormal(nonlinearity=nonlinearity)
    assert not init.uses_caller_gain
    layer = nn.Linear(500, 2000)
    init.init_module_(layer, gain=10.0, generator=gen())
    assert_variance(layer.weight, gain**2 / 500)


def test_kaiming_leaky_relu_slope():
    layer = nn.Linear(500, 2000)
    resolve_initializer("kaiming_uniform:nonlinearity=leaky_relu,a=0.2,mode=fan_out").init_module_(
        layer, gain=10.0, generator=gen()
    )
    assert_variance(layer.weight, 2 / (1 + 0.04) / 2000, fourth_moment_ratio=9 / 5)


# --------------------------------------------------------------------------------------------
# keep, default, unknown modules
# --------------------------------------------------------------------------------------------


def test_keep_touches_nothing():
    layer = nn.Linear(5, 5)
    before = [p.clone() for p in layer.parameters()]
    assert gi.Keep().init_module_(layer, gain=1.0, generator=gen())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 5), lambda: nn.Conv2d(3, 4, 3), lambda: nn.LSTM(3, 4),
                                  lambda: nn.Embedding(10, 4, padding_idx=0), lambda: nn.LayerNorm(4)])  # fmt: skip
def test_default_reproduces_reset_parameters_under_the_global_seed(make):
    reference, ours = make(), make()
    torch.manual_seed(123)
    reference.reset_parameters()
    scramble_(ours)
    torch.manual_seed(123)
    assert gi.Default().init_module_(ours, gain=5.0, generator=gen())
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_default_attention_and_modules_without_reset():
    torch.manual_seed(0)
    mha = scramble_(nn.MultiheadAttention(8, 2))
    assert gi.Default().init_module_(mha, gain=1.0, generator=gen())
    assert torch.all(mha.in_proj_bias == 0) and mha.in_proj_weight.abs().max() < 3 * math.sqrt(6 / 32)

    class Alpha(nn.Module):  # own parameter, no reset_parameters
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(3))

    assert not gi.Default().init_module_(Alpha(), gain=1.0, generator=gen())
    assert not gi.Default().init_module_(nn.ReLU(), gain=1.0, generator=gen())


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(3))
        self.inner = nn.Linear(2, 2)


class ScaledLinear(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)
        self.scale = nn.Parameter(torch.full((3,), 2.0))


@pytest.mark.parametrize("name", WRITING)
@pytest.mark.parametrize(
    "make", [Scale, ScaledLinear, lambda: nn.PReLU(3)], ids=["custom", "subclass_extra", "prelu"]
)
def test_unknown_parameters_are_left_as_built(name, make):
    module = make()
    before = {n: p.clone() for n, p in module.named_parameters(recurse=False)}
    assert not resolve_initializer(name).init_module_(module, gain=1.0, generator=gen())
    for n, p in module.named_parameters(recurse=False):
        assert torch.equal(p, before[n]), n


def test_weight_norm_parametrisation_is_not_handled():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    # the Linear now owns only `bias`; its weight lives in the parametrization's `original0/1`
    param_owner = layer.parametrizations.weight
    assert not gi.Normal().init_module_(param_owner, gain=1.0, generator=gen())


def test_modules_without_parameters_and_lazy_modules():
    assert gi.Normal().init_module_(nn.ReLU(), gain=1.0, generator=gen())
    lazy = nn.LazyLinear(4)
    assert not gi.Normal().init_module_(lazy, gain=1.0, generator=gen())


# --------------------------------------------------------------------------------------------
# InitPlan
# --------------------------------------------------------------------------------------------


def test_plan_first_matching_glob_wins_in_insertion_order():
    plan = InitPlan.from_spec("kaiming_normal", {"layers.*.fc2": "zeros", "layers.1.*": "normal:std=0.02"})
    assert plan.for_module("layers.1.fc2").name == "zeros"
    assert plan.for_module("layers.1.fc1").describe() == "normal(std=0.02)"
    assert plan.for_module("layers.0.fc2").name == "zeros"
    assert plan.for_module("head").name == "kaiming_normal"
    assert plan.for_module("layers").name == "kaiming_normal"

    reversed_plan = InitPlan.from_spec(
        "kaiming_normal", {"layers.1.*": "normal:std=0.02", "layers.*.fc2": "zeros"}
    )
    assert reversed_plan.for_module("layers.1.fc2").name == "normal"
    assert plan.describe() == "kaiming_normal; layers.*.fc2=zeros; layers.1.*=normal(std=0.02)"


def test_plan_is_case_sensitive_and_exact():
    plan = InitPlan.from_spec("keep", {"head": "zeros"})
    assert plan.for_module("head").name == "zeros"
    assert plan.for_module("Head").name == "keep"
    assert plan.for_module("head.proj").name == "keep"


def test_plan_is_keep_and_validation():
    assert InitPlan.from_spec("keep").is_keep
    assert InitPlan.from_spec("keep", {"x": "keep"}).is_keep
    assert not InitPlan.from_spec("keep", {"head": "zeros"}).is_keep
    assert not InitPlan.from_spec("default").is_keep
    with pytest.raises(UsageError, match="'xavier'"):
        InitPlan.from_spec("keep", {"head": "xavier"})
    with pytest.raises(UsageError, match="glob"):
        InitPlan.from_spec("keep", {"": "zeros"})
    plan = InitPlan.from_spec(gi.Normal(std=0.5))
    assert InitPlan.from_spec(plan) is plan


def test_module_doctests():
    result = doctest.testmod(gi, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


def test_weight_fans_agrees_with_fans_on_every_module_type() -> None:
    from gradprobe.initializers import weight_fans

    modules = [
        nn.Linear(3, 4),
        nn.Linear(3, 4, bias=False),
        nn.Bilinear(2, 3, 4),
        nn.Conv2d(4, 8, 3, groups=2),
        nn.ConvTranspose2d(4, 6, 3),
        nn.LSTM(5, 6, 2, bidirectional=True, proj_size=3),
        nn.GRU(3, 4),
        nn.LSTMCell(3, 4),
        nn.MultiheadAttention(8, 2),
        nn.MultiheadAttention(8, 2, kdim=3, vdim=5),
        nn.Embedding(5, 3),
        nn.LayerNorm(4),
        nn.BatchNorm2d(3),
        nn.PReLU(),
    ]
    checked = 0
    for module in modules:
        found = weight_fans(module)
        for name, p in module._parameters.items():
            if p is None:
                continue
            try:
                expected: tuple[int, int] | None = fans(module, name)
            except UsageError:
                expected = None
            assert found.get(name) == expected, (module, name)
            checked += expected is not None
    assert checked >= 20


def test_set_norm_scale_touches_only_normalization_scales() -> None:
    from gradprobe.initializers import set_norm_scale_

    ln = nn.LayerNorm(4)
    assert set_norm_scale_(ln, 0.25) and torch.equal(ln.weight, torch.full((4,), 0.25))
    assert torch.equal(ln.bias, torch.zeros(4))  # the shift is not a scale
    assert not set_norm_scale_(nn.LayerNorm(4, elementwise_affine=False), 0.0)
    linear = nn.Linear(3, 3)
    before = linear.weight.detach().clone()
    assert not set_norm_scale_(linear, 0.0) and torch.equal(linear.weight, before)
