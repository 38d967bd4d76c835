"""Reference architectures built in code, each with a known answer at initialization.

Every builder returns an ``nn.Module`` with small defaults, so CPU tests stay fast. Construction
draws from torch's global RNG, so a caller who seeds torch gets the same weights every time;
:func:`example` does that seeding itself, inside ``torch.random.fork_rng`` so the caller's RNG state
is left alone.

The known answers ("trainable as built", or the pathology the model has) come from the literature
summarised in the project's reference notes: He et al. 2015 for ReLU MLPs, the residual-stream laws
(unnormalised branches double the variance per block; zero gates give exactly 1), Fixup, ReZero,
ZerO, and the observation that VGG-style nets train under PyTorch's own init even though their
per-element gradient variance falls by orders of magnitude across pooling.

:data:`CATALOG` names every model together with an input factory, so tests, the benchmark and
``gradprobe demo`` can iterate over them::

    >>> model, inputs = example("mlp")
    >>> model(inputs).shape
    torch.Size([8, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradprobe.errors import UsageError
from gradprobe.rng import stream_seed

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "Bottleneck",
    "CATALOG",
    "ClassifierOutput",
    "DataclassOutputNet",
    "DictOutputNet",
    "Example",
    "FailingNet",
    "LayerScale",
    "ReZeroBlock",
    "RecurrentClassifier",
    "ResNet",
    "ResidualBlock",
    "SharedMLP",
    "TransformerBlock",
    "TransformerLM",
    "VGGStyle",
    "demo_model",
    "example",
    "frozen_mlp",
    "gru_classifier",
    "identity_mlp",
    "lstm_classifier",
    "mlp",
    "residual_mlp",
    "resnet50_style",
    "resnet_style",
    "rezero_mlp",
    "shared_mlp",
    "transformer",
    "vgg_style",
    "zero_head_mlp",
]

# activation name → factory of a fresh module (a registry, not a chain of ifs)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "selu": nn.SELU,
    "elu": nn.ELU,
    "softsign": nn.Softsign,
    "hardtanh": nn.Hardtanh,
    "identity": nn.Identity,
}

# norm name → factory taking the number of features
_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm1d,
    "layer": nn.LayerNorm,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise UsageError(
            f"unknown activation {name!r}", hint=f"choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def _norm(name: str | None, features: int) -> nn.Module | None:
    if name is None:
        return None
    try:
        return _NORMS[name](features)
    except KeyError:
        raise UsageError(
            f"unknown norm {name!r}", hint=f"choose None or one of {', '.join(_NORMS)}"
        ) from None


def _kaiming_normal_(linear: nn.Linear, nonlinearity: Literal["relu", "linear"] = "relu") -> nn.Linear:
    """He normal weights, Var = gain²/fan_in with the gain of the nonlinearity that *follows* the
    layer (torch's convention: √2 before a ReLU, 1 before a residual add or the output), and a zero
    bias: the init under which the known answers below hold exactly, independent of PyTorch's
    default."""
    nn.init.kaiming_normal_(linear.weight, nonlinearity=nonlinearity)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


# --------------------------------------------------------------------------------------------
# Plain MLPs
# --------------------------------------------------------------------------------------------


def mlp(
    depth: int = 10,
    width: int = 256,
    in_features: int | None = None,
    out_features: int = 10,
    activation: str = "relu",
    bias: bool = True,
    norm: str | None = None,
) -> nn.Sequential:
    """A plain MLP: ``depth`` hidden ``Linear`` layers, each followed by an optional norm
    (``"batch"`` → BatchNorm1d, ``"layer"`` → LayerNorm) and the activation, then a Linear head.

    Known answer with the defaults (ReLU, PyTorch's default init U(±1/√fan_in), so n·Var[w] = 1/3):
    the activation second moment shrinks ≈ 6× per layer until the bias floor, and the
    between-sample variance keeps shrinking (≈ 1e-8 after 10 layers, mean pairwise cosine → 1):
    **vanishing, not trainable as built**. Under He init it is stable; under Xavier the gain is 1/2
    per layer.

    Input: ``(N, in_features)``, ``in_features`` defaulting to ``width``. Output ``(N, out_features)``.
    """
    in_features = width if in_features is None else in_features
    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width, bias=bias))
        normalization = _norm(norm, width)
        if normalization is not None:
            layers.append(normalization)
        layers.append(_activation(activation))
        fan_in = width
    layers.append(nn.Linear(fan_in, out_features, bias=bias))
    return nn.Sequential(*layers)


def demo_model() -> nn.Sequential:
    """The model ``gradprobe demo`` probes: 30 hidden ``Linear(256, 256)`` + ReLU layers and a
    Linear head to 10 classes, without biases.

    Known answer: the textbook case of He et al. 2015. Under Xavier (n·Var[w] = 1 for a square
    layer) each ReLU layer halves the activation second moment, so after 30 layers it is ≈ 2^-31,
    2^-30 of what He/Kaiming init (gain √2, n·Var[w] = 2) keeps at a stable ≈ 1/2. Biases are left out so that
    the answer holds whatever an initializer does with them. As built (PyTorch's default init)
    it vanishes: **not trainable as built**.
    """
    return mlp(depth=30, width=256, out_features=10, activation="relu", bias=False)


def frozen_mlp(depth: int = 6, width: int = 128) -> nn.Sequential:
    """A ReLU MLP (He init, zero biases) whose first two hidden ``Linear`` layers have
    ``requires_grad=False``: their parameters get no gradient by design.

    Known answer: **trainable as built**. The frozen layers still carry the signal forward, and every
    layer is He-initialised, so activations and back-propagated gradients stay stable; the frozen
    parameters simply get no gradient, which a detector must not call dead.
    Input ``(N, width)``, output ``(N, 10)``.
    """
    model = mlp(depth=depth, width=width, out_features=10, activation="relu")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for linear in linears[:-1]:
        _kaiming_normal_(linear, "relu")
    _kaiming_normal_(linears[-1], "linear")
    for linear in linears[:2]:
        linear.requires_grad_(False)
    return model


def zero_head_mlp(depth: int = 6, width: int = 128) -> nn.Sequential:
    """A He-initialised ReLU MLP whose final ``Linear`` has weight and bias exactly 0 (the
    Fixup-style zero classifier).

    Known answer: **trainable**. Logits are 0 at init, so cross-entropy is ln C; at step 0 only the
    classifier gets a nonzero gradient, and after one step the gradient reaches every layer. The
    zero head is a symmetry false positive, not a trap. Input ``(N, width)``, output ``(N, 10)``.
    """
    model = mlp(depth=depth, width=width, out_features=10, activation="relu")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for linear in linears[:-1]:
        _kaiming_normal_(linear, "relu")
    head = linears[-1]
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return model


def identity_mlp(depth: int = 8, width: int = 128) -> nn.Sequential:
    """``depth`` square ``Linear(width, width)`` layers initialised to the identity matrix with a zero
    bias, ReLU between them (ZerO-style, Zhao et al. 2021).

    Known answer: **trainable**. The weights are deterministic and 99% zeros, yet this is not a
    symmetry trap: every row (and every column) is distinct, so no two units receive identical
    gradients. For depth ≥ 2 the output equals ``relu(x)`` exactly. Input and output ``(N, width)``.
    """
    layers: list[nn.Module] = []
    for index in range(depth):
        if index > 0:
            layers.append(nn.ReLU())
        linear = nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(width))
            linear.bias.zero_()
        layers.append(linear)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Residual MLPs
# --------------------------------------------------------------------------------------------


class ReZeroBlock(nn.Module):
    """``x + alpha * f(x)`` with ``f = Linear → activation → Linear`` and ``alpha`` a scalar
    parameter initialised to 0 (Bachlechner et al. 2020)."""

    def __init__(self, width: int, activation: str = "relu") -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), _activation(activation), nn.Linear(width, width))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.branch(x)


def rezero_mlp(depth: int = 8, width: int = 128, activation: str = "relu") -> nn.Sequential:
    """``depth`` ReZero residual blocks ``x + alpha * f(x)`` (``alpha`` = 0 at init), then a Linear
    head to 10 classes.

    Known answer: **trainable**. At init every block is exactly the identity, so the residual stream
    keeps variance 1 and the output equals ``head(x)``; the branch weights get exactly zero gradient
    at step 0 (gated by design, not dead) while each ``alpha`` gets a nonzero one.
    Input ``(N, width)``, output ``(N, 10)``.
    """
    blocks: list[nn.Module] = [ReZeroBlock(width, activation) for _ in range(depth)]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


class ResidualBlock(nn.Module):
    """``x + f(x)`` with ``f = Linear → (BN) → ReLU → Linear → (BN)``, He-initialised, zero biases."""

    def __init__(self, width: int, norm: str | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [_kaiming_normal_(nn.Linear(width, width), "relu")]
        first_norm = _norm(norm, width)
        if first_norm is not None:
            layers.append(first_norm)
        layers += [nn.ReLU(), _kaiming_normal_(nn.Linear(width, width), "linear")]
        last_norm = _norm(norm, width)
        if last_norm is not None:
            layers.append(last_norm)
        self.branch = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def residual_mlp(depth: int = 8, width: int = 128, norm: str | None = None) -> nn.Sequential:
    """``depth`` unnormalised residual blocks ``x + f(x)``, ``f = Linear → ReLU → Linear`` with He
    init (gain √2 before the ReLU, 1 before the add) and zero biases, then a Linear head to 10 classes.

    Known answer (the exploding-forward case): each He branch returns a signal with the variance of
    its input, uncorrelated with it, so the residual stream's variance **doubles per block**:
    2^depth = 256× after 8 blocks. **Not trainable as built.** With ``norm="batch"`` each branch is
    ``Linear → BN → ReLU → Linear → BN`` (the ResNet block's layout), so it adds variance exactly 1
    and the stream grows linearly: 1 + depth for unit-variance input. Input ``(N, width)``, output
    ``(N, 10)``.
    """
    blocks: list[nn.Module] = [ResidualBlock(width, norm) for _ in range(depth)]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


class SharedMLP(nn.Module):
    """One ``Linear`` + ``Tanh`` applied ``repeats`` times (shared weights), then a head."""

    def __init__(self, width: int = 64, repeats: int = 6, out_features: int = 10) -> None:
        super().__init__()
        self.repeats = repeats
        self.shared = nn.Linear(width, width)
        self.activation = nn.Tanh()
        self.head = nn.Linear(width, out_features)
        # σ_w = 1, σ_b = 0: the critical point of the tanh mean-field map (Schoenholz et al. 2017).
        nn.init.normal_(self.shared.weight, std=width**-0.5)
        nn.init.zeros_(self.shared.bias)

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.repeats):
            x = self.activation(self.shared(x))
        return self.head(x)


def shared_mlp(width: int = 64, repeats: int = 6) -> SharedMLP:
    """ONE ``nn.Linear`` + ``nn.Tanh`` called ``repeats`` times per forward (weight sharing, as in an
    unrolled RNN), then a Linear head to 10 classes.

    Known answer: **trainable**. The shared weights are N(0, 1/width) with a zero bias, the critical
    tanh initialisation, where the signal decays only polynomially. For a probe this is the
    several-calls case: hooks on ``shared`` fire ``repeats`` times per forward and the gradients
    arrive in reverse order. Input ``(N, width)``, output ``(N, 10)``.
    """
    return SharedMLP(width=width, repeats=repeats)


# --------------------------------------------------------------------------------------------
# Convolutional nets
# --------------------------------------------------------------------------------------------


class VGGStyle(nn.Module):
    """``features`` (conv stages), flatten, ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_style(
    num_classes: int = 10,
    channels: tuple[int, ...] = (16, 32, 64),
    in_channels: int = 3,
    batch_norm: bool = False,
    hidden: int = 128,
    dropout: float = 0.5,
) -> VGGStyle:
    """A small VGG for 3×32×32 images: per stage conv3x3 → (BN) → ReLU → conv3x3 → (BN) → ReLU →
    MaxPool2d(2); then flatten, Linear → ReLU → Dropout → Linear. ReLUs are in place, as in
    torchvision's VGG.

    Known answer: **trainable as built** with PyTorch's own init. The trap it sets for a detector:
    per-element gradient variance falls by orders of magnitude between the head and the first conv
    (each 2×2 max-pool alone divides it by 4), yet nets like this train fine; compare like with like
    across shape changes. Input ``(N, in_channels, 32, 32)``, output ``(N, num_classes)``.
    """
    layers: list[nn.Module] = []
    fan_in = in_channels
    for width in channels:
        for _ in range(2):
            layers.append(nn.Conv2d(fan_in, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            fan_in = width
        layers.append(nn.MaxPool2d(2))
    side = 32 // 2 ** len(channels)
    if side < 1:
        raise UsageError(f"vgg_style got {len(channels)} stages", hint="at most 5 stages fit a 32×32 input")
    classifier = nn.Sequential(
        nn.Linear(fan_in * side * side, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    return VGGStyle(nn.Sequential(*layers), classifier)


class BasicBlock(nn.Module):
    """CIFAR/ResNet-18 block: conv3x3 → BN → ReLU → conv3x3 → BN, ``out += identity``, ReLU.

    Written the way torchvision writes it: one in-place ``relu`` module called twice and an in-place
    add, the combination that breaks ``register_full_backward_hook``.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch: the one ``zero_init_residual`` sets to γ = 0."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet-50 block: conv1x1 → BN → ReLU → conv3x3 (stride here) → BN → ReLU → conv1x1 (×4
    channels) → BN, ``out += identity``, ReLU; torchvision's layout (ResNet v1.5)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch: the one ``zero_init_residual`` sets to γ = 0."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1×1 strided conv + BN on the shortcut when the shape changes, else the bare identity."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ResNet(nn.Module):
    """Stem, stages named ``layer1`` … ``layerN`` (torchvision's names), global average pool, fc."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: tuple[int, ...],
        width: int,
        num_classes: int,
        imagenet_stem: bool,
        zero_init_residual: bool,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module | None = nn.MaxPool2d(3, stride=2, padding=1) if imagenet_stem else None
        self.stage_names: list[str] = []
        channels = width
        for index, count in enumerate(blocks):
            planes = width * 2**index
            stage: list[nn.Module] = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                stage.append(block(channels, planes, stride))
                channels = planes * block.expansion
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        # The well-known ResNet recipe: He normal on fan_out for convs, BN γ = 1, β = 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_style(
    num_classes: int = 10,
    blocks: tuple[int, ...] = (2, 2, 2),
    width: int = 16,
    zero_init_residual: bool = False,
) -> ResNet:
    """A CIFAR-style ResNet (He et al. 2016): conv3x3 stem + BN + ReLU, stages of ``BasicBlock`` with
    widths ``width·2^i`` (stride 2 from the second stage on, 1×1 conv + BN shortcut), global average
    pool, fc. Convs He-normal on fan_out; in-place ReLU and in-place ``out += identity``.

    Known answer: **trainable as built**. BN-normalised branches make the residual stream grow
    linearly with depth, not exponentially. With ``zero_init_residual=True`` each block's last BN γ
    is 0, so every block starts as (ReLU of) its shortcut: exact variance preservation, a
    symmetry false positive for a detector. Input ``(N, 3, 32, 32)``, output ``(N, num_classes)``.
    """
    return ResNet(
        BasicBlock, blocks, width, num_classes, imagenet_stem=False, zero_init_residual=zero_init_residual
    )


def resnet50_style(
    num_classes: int = 1000,
    layers: tuple[int, ...] = (3, 4, 6, 3),
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """ImageNet ResNet-50 (v1.5, torchvision's layout): 7×7/2 conv + BN + ReLU + 3×3/2 max-pool stem,
    ``Bottleneck`` stages (1×1, 3×3 carrying the stride, 1×1 with expansion 4), global average pool,
    fc. With the defaults it has exactly 25,557,032 parameters, the published ResNet-50 count.

    Known answer: **trainable as built** (He fan_out init, BN in every branch). The realistic-size
    case: 16 blocks, one in-place ReLU module called three times per block, in-place residual add.
    Input ``(N, 3, 224, 224)`` (any size ≥ 32 works), output ``(N, num_classes)``.
    """
    return ResNet(
        Bottleneck, layers, width, num_classes, imagenet_stem=True, zero_init_residual=zero_init_residual
    )


# --------------------------------------------------------------------------------------------
# Sequence models
# --------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + ls1(attn(ln1(x)))`` then ``x + ls2(mlp(ln2(x)))``."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, layer_scale: float | None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.ls1: nn.Module = LayerScale(d_model, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2: nn.Module = LayerScale(d_model, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        h = self.ln1(x)
        attended, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        x = x + self.ls1(attended)
        return x + self.ls2(self.mlp(self.ln2(x)))


class TransformerLM(nn.Module):
    """GPT-style decoder: token embedding + learned positions, pre-LN blocks, final LN, LM head."""

    causal_mask: Tensor | None

    def __init__(
        self,
        depth: int,
        d_model: int,
        heads: int,
        vocab_size: int,
        max_len: int,
        mlp_ratio: int,
        layer_scale: float | None,
        causal: bool,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        # A bare parameter outside any submodule on purpose: tools that only walk submodules miss it.
        self.position_embedding = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, mlp_ratio, layer_scale) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        # −inf above the diagonal, added to the scores before softmax: intended, not a numerical fault.
        mask = torch.full((max_len, max_len), float("-inf")).triu(1) if causal else None
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        x = self.token_embedding(tokens) + self.position_embedding[:, :length]
        mask = None if self.causal_mask is None else self.causal_mask[:length, :length]
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return self.head(self.ln_f(x))


def transformer(
    depth: int = 2,
    d_model: int = 64,
    heads: int = 4,
    vocab_size: int = 100,
    max_len: int = 64,
    mlp_ratio: int = 4,
    layer_scale: float | None = None,
    causal: bool = True,
) -> TransformerLM:
    """A pre-LN GPT-style language model: ``nn.Embedding`` tokens + a learned positional
    ``nn.Parameter``, ``depth`` blocks of LayerNorm → ``nn.MultiheadAttention`` (float causal mask
    with −inf above the diagonal as ``attn_mask``) → residual add, LayerNorm → Linear → GELU →
    Linear → residual add; optional LayerScale (per-channel scale initialised to ``layer_scale``,
    e.g. 1e-6) on each branch; final LayerNorm; Linear LM head.

    Known answer: **trainable as built**. The −inf entries in the mask are intended and never
    produce NaN (the diagonal is always visible). With a tiny LayerScale every block is nearly the
    identity at init, a gate, not a vanishing gradient.
    Input: token ids ``(N, T)`` int64 with ``T ≤ max_len``; output logits ``(N, T, vocab_size)``.
    """
    return TransformerLM(depth, d_model, heads, vocab_size, max_len, mlp_ratio, layer_scale, causal)


class RecurrentClassifier(nn.Module):
    """Embedding → ``nn.LSTM``/``nn.GRU`` (batch_first) → Linear on the last time step."""

    def __init__(
        self, rnn_type: type[nn.LSTM] | type[nn.GRU], vocab_size: int, embed: int, hidden: int, layers: int,
        num_classes: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.rnn = rnn_type(embed, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        # LSTM returns (out, (h, c)) and GRU (out, h); only the top layer's sequence is used.
        out, _ = self.rnn(self.embedding(tokens))
        return self.fc(out[:, -1])


def lstm_classifier(
    vocab_size: int = 100, embed: int = 32, hidden: int = 64, layers: int = 2, num_classes: int = 5
) -> RecurrentClassifier:
    """A sequence classifier: ``nn.Embedding`` → ``nn.LSTM(batch_first=True)`` (its output is the
    nested tuple ``(out, (h, c))``) → Linear on the last time step.

    Known answer: **trainable as built** with PyTorch's default init (U(±1/√hidden) per gate).
    For a probe: the weights are raw per-gate-stacked parameters (``weight_ih_l0``, …), not Linear
    submodules. Input: token ids ``(N, T)`` int64; output ``(N, num_classes)``.
    """
    return RecurrentClassifier(nn.LSTM, vocab_size, embed, hidden, layers, num_classes)


def gru_classifier(
    vocab_size: int = 100, embed: int = 32, hidden: int = 64, layers: int = 2, num_classes: int = 5
) -> RecurrentClassifier:
    """As :func:`lstm_classifier` with ``nn.GRU`` (output ``(out, h)``, three gates per chunk).

    Known answer: **trainable as built**. Input: token ids ``(N, T)`` int64; output ``(N, num_classes)``.
    """
    return RecurrentClassifier(nn.GRU, vocab_size, embed, hidden, layers, num_classes)


# --------------------------------------------------------------------------------------------
# Output containers and failure
# --------------------------------------------------------------------------------------------


class DictOutputNet(nn.Module):
    """A two-hidden-layer ReLU MLP that returns ``{"logits": (N, num_classes), "hidden": (N, hidden)}``.

    Known answer: **trainable as built** (shallow, PyTorch's default init). For a probe: the output
    is a dict, so the loss must pick ``"logits"``, and ``register_full_backward_hook`` never fires.
    Input ``(N, in_features)``.
    """

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hidden = self.body(x)
        return {"logits": self.head(hidden), "hidden": hidden}


@dataclass
class ClassifierOutput:
    """What :class:`DataclassOutputNet` returns, shaped like Hugging Face's ``ModelOutput``."""

    loss: Tensor | None
    logits: Tensor
    hidden_states: tuple[Tensor, ...]


class DataclassOutputNet(nn.Module):
    """A two-hidden-layer ReLU MLP returning a :class:`ClassifierOutput` dataclass: ``loss`` (cross
    entropy when ``labels`` are given, else None), ``logits`` and ``hidden_states`` (one per hidden
    layer), as a Hugging Face model does.

    Known answer: **trainable as built**. Input ``forward(x, labels=None)`` with ``x`` of shape
    ``(N, in_features)`` and int64 ``labels`` of shape ``(N,)``.
    """

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        first = self.layer1(x)
        second = self.layer2(first)
        logits = self.head(second)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits, hidden_states=(first, second))


class FailingNet(nn.Module):
    """Runs two Linear + ReLU layers, then applies a ``Linear`` whose ``in_features`` is wrong for the
    hidden state, so every forward raises ``RuntimeError`` midway.

    Known answer: **fails**. It exists to test that a probe that fails partway leaves the model
    exactly as it was (parameters, buffers, mode, hooks) and names the module that failed
    (``broken``). Input ``(N, width)``.
    """

    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.broken = nn.Linear(width, 10)  # expects `width` features, receives `hidden`

    def forward(self, x: Tensor) -> Tensor:
        return self.broken(self.body(x))


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A catalogue entry: how to build the model (default arguments) and a matching input batch."""

    name: str
    build: Callable[..., nn.Module]
    make_inputs: Callable[[int, torch.Generator], Any]  # (batch, generator) → tensor | tuple | dict
    description: str
    trainable_as_built: bool  # the known answer for the model exactly as `build()` returns it


def _gaussian(*shape: int) -> Callable[[int, torch.Generator], Tensor]:
    def make(batch: int, generator: torch.Generator) -> Tensor:
        return torch.randn(batch, *shape, generator=generator)

    return make


def _tokens(vocab_size: int, length: int) -> Callable[[int, torch.Generator], Tensor]:
    def make(batch: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, vocab_size, (batch, length), generator=generator, dtype=torch.int64)

    return make


def _features_and_labels(batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "x": torch.randn(batch, 32, generator=generator),
        "labels": torch.randint(0, 10, (batch,), generator=generator, dtype=torch.int64),
    }


_ENTRIES = [
    Example("mlp", mlp, _gaussian(256), "10-layer ReLU MLP, PyTorch default init: vanishing", False),
    Example("vgg_style", vgg_style, _gaussian(3, 32, 32), "small VGG, PyTorch init: trains despite tiny conv gradients", True),
    Example("resnet_style", resnet_style, _gaussian(3, 32, 32), "CIFAR ResNet (BasicBlock, BN, in-place ReLU)", True),
    Example("resnet50_style", resnet50_style, _gaussian(3, 224, 224), "ImageNet ResNet-50, 25,557,032 parameters", True),
    Example("transformer", transformer, _tokens(100, 32), "pre-LN GPT-style LM with a −inf causal mask", True),
    Example("lstm_classifier", lstm_classifier, _tokens(100, 12), "Embedding → 2-layer LSTM → Linear", True),
    Example("gru_classifier", gru_classifier, _tokens(100, 12), "Embedding → 2-layer GRU → Linear", True),
    Example("rezero_mlp", rezero_mlp, _gaussian(128), "ReZero residual MLP, alpha = 0: gated, not dead", True),
    Example("zero_head_mlp", zero_head_mlp, _gaussian(128), "He MLP with an all-zero classifier (Fixup-style)", True),
    Example("identity_mlp", identity_mlp, _gaussian(128), "identity-initialised ReLU MLP (ZerO): not a symmetry trap", True),
    Example("shared_mlp", shared_mlp, _gaussian(64), "one Linear + Tanh called 6 times per forward", True),
    Example("dict_output", DictOutputNet, _gaussian(32), "returns {'logits', 'hidden'}", True),
    Example("dataclass_output", DataclassOutputNet, _features_and_labels, "returns a ModelOutput-like dataclass with a loss", True),
    Example("frozen_mlp", frozen_mlp, _gaussian(128), "He MLP whose first two Linear layers are frozen", True),
    Example("failing", FailingNet, _gaussian(32), "raises RuntimeError midway through forward", False),
    Example("residual_mlp", residual_mlp, _gaussian(128), "unnormalised He residual MLP: variance doubles per block", False),
    Example("demo_model", demo_model, _gaussian(256), "30-layer ReLU MLP of `gradprobe demo`: Xavier vanishes, He is stable", False),
]  # fmt: skip

CATALOG: dict[str, Example] = {entry.name: entry for entry in _ENTRIES}


def example(name: str, *, batch: int = 8, seed: int = 0) -> tuple[nn.Module, Any]:
    """Build catalogue entry ``name`` with its default arguments and an input batch for it.

    The model is built under ``torch.manual_seed(seed)`` inside ``fork_rng`` (the caller's global RNG
    is untouched) and the inputs come from a ``torch.Generator`` seeded from ``seed``
    (:func:`gradprobe.rng.stream_seed`), so the same call always returns the same weights and inputs.
    """
    try:
        entry = CATALOG[name]
    except KeyError:
        raise UsageError(f"unknown zoo model {name!r}", hint=f"choose one of {', '.join(CATALOG)}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build()
    # the inputs from a stream of their own: a generator seeded with `seed` itself would repeat the
    # numbers the weights were just built from (torch.manual_seed(seed) is the same stream)
    inputs = entry.make_inputs(batch, torch.Generator().manual_seed(stream_seed(seed, "zoo-inputs")))
    return model, inputs
