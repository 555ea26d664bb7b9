"""CIFAR ResNets as in the IEBN and DIANet papers' official code: basic ResNet-20/32/56/110 (6n+2),
bottleneck ResNet-164 (9n+2) and pre-activation PreResNet-164, each with ``norm`` in
{bn, iebn, none} and ``attention`` in {none, se, dia}.

Layout (readable names, so recorders can address e.g. ``layer2.1.bn2``): ``stem`` (conv, bn, relu;
conv only for pre-activation), stages ``layer1..layer3`` whose blocks are indexable (``layer2[1]``,
named ``layer2.1``), a DIA stage's shared cell at ``layerK.dia``, then ``bn_final``/``relu_final``
(pre-activation only), ``avgpool``, ``fc``.

Choices where the papers leave room (documented, not from the papers):

- Shortcut (all families): identity when the shape is kept, otherwise a projection ``1x1 conv``
  (+ BN for post-activation blocks, none for pre-activation ones), option B, as in the official
  code. With ``skip=False`` there is no shortcut (and no projection) at all.
- ``norm="iebn"``: the stem BN and every in-block BN become IEBN; the projection-shortcut BN stays
  plain BN unless ``convert_shortcut_bn=True`` (official placement). In PreResNet-164 the final BN
  before pooling is IEBN too.
- ``norm="none"``: every norm becomes an identity and the convolutions that fed a norm get a bias
  (BN's shift would otherwise be lost).
- DIA in PreResNet-164: the extra BN at the end of the residual branch (``bn_additional``), as in
  the official DIANet code; without DIA the plain pre-activation block has none.
- SE: the excitation scales the residual branch after its last norm (``block.se``), timm-style,
  hidden width ``C // 16``.
- Init as in the official code: conv weights N(0, sqrt(2 / (k^2 C_out))), BN weight 1 / bias 0,
  IEBN gate parameters at (0, -1), linear layers PyTorch default. ``zero_init_residual`` zeroes the
  last norm's weight of each residual branch (the last conv's weight where the branch ends in a conv).
- Attribution safety: no in-place ReLU, the residual addition is ``out = branch + identity``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

from torch import Tensor, nn

from workbench.models.registry import register_model
from workbench.nn.dia import DIALSTMCell
from workbench.nn.norms import NORM_KINDS, NormLayer, get_norm_layer, is_identity_norm
from workbench.nn.probe import AttentionProbe
from workbench.nn.se import SEModule

NORMS = NORM_KINDS
ATTENTIONS = ("none", "se", "dia")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)


class _ResidualBlock(nn.Module):
    """Common protocol: ``residual(x) -> (branch, identity)`` then ``merge(branch, identity)``.

    A DIA stage calls the two halves itself to scale ``branch`` by its attention in between.

    Blocks take their norm as an injected constructor, as torchvision's do: ``norm_layer(channels)``
    for the branch (``nn.Identity``: no normalisation, the convolutions then get a bias) and
    ``shortcut_norm_layer`` for a projection shortcut (``None``: the same as ``norm_layer``);
    :func:`workbench.nn.norms.get_norm_layer` turns a ``norm`` name into one.
    """

    expansion = 1
    post_activation = True

    def _finish_init(self, inplanes: int, out_channels: int, stride: int, skip: bool,
                     shortcut_norm_layer: NormLayer | None, attention: str, se_reduction: int) -> None:
        """The parts after the branch: shortcut (a projection where the shape changes), SE, DIA mark, ReLU."""
        self.skip = skip
        needs_projection = skip and (stride != 1 or inplanes != out_channels)
        self.downsample = _projection(inplanes, out_channels, stride, shortcut_norm_layer) if needs_projection else None
        self.se = SEModule(out_channels, se_reduction) if attention == "se" else None
        # DIA's attention comes from the stage's shared cell; the block only marks where it applies.
        self.attention_probe = AttentionProbe("dia") if attention == "dia" else None
        self.relu_out = nn.ReLU(inplace=False) if self.post_activation else None

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def residual(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.branch(x)
        if self.se is not None:
            out = self.se(out)
        if not self.skip:
            return out, None
        return out, (x if self.downsample is None else self.downsample(x))

    def merge(self, branch: Tensor, identity: Tensor | None) -> Tensor:
        out = branch if identity is None else branch + identity
        return self.relu_out(out) if self.relu_out is not None else out

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(*self.residual(x))

    def last_branch_layer(self) -> nn.Module:
        raise NotImplementedError


def _projection(in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer | None) -> nn.Sequential:
    """Option-B shortcut: ``1x1 conv`` (+ ``norm_layer``; ``None``: the conv alone, no bias)."""
    if norm_layer is None:
        return nn.Sequential(OrderedDict(conv=_conv(in_ch, out_ch, 1, stride)))
    return nn.Sequential(OrderedDict(conv=_conv(in_ch, out_ch, 1, stride, bias=is_identity_norm(norm_layer)),
                                     bn=norm_layer(out_ch)))


class BasicBlock(_ResidualBlock):
    """``conv3x3 -> norm -> relu -> conv3x3 -> norm`` (+ shortcut) -> relu."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 attention: str = "none", skip: bool = True, se_reduction: int = 16,
                 shortcut_norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        bias = is_identity_norm(norm_layer)
        self.conv1 = _conv(inplanes, planes, 3, stride, bias)
        self.bn1 = norm_layer(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv(planes, planes, 3, 1, bias)
        self.bn2 = norm_layer(planes)
        self._finish_init(inplanes, planes, stride, skip, shortcut_norm_layer or norm_layer, attention, se_reduction)

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))

    def last_branch_layer(self) -> nn.Module:
        return self.bn2 if not isinstance(self.bn2, nn.Identity) else self.conv2


class Bottleneck(_ResidualBlock):
    """``conv1x1 -> norm -> relu -> conv3x3 -> norm -> relu -> conv1x1 (x4) -> norm`` (+ shortcut) -> relu."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 attention: str = "none", skip: bool = True, se_reduction: int = 16,
                 shortcut_norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        bias = is_identity_norm(norm_layer)
        out = planes * self.expansion
        self.conv1 = _conv(inplanes, planes, 1, 1, bias)
        self.bn1 = norm_layer(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv(planes, planes, 3, stride, bias)
        self.bn2 = norm_layer(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = _conv(planes, out, 1, 1, bias)
        self.bn3 = norm_layer(out)
        self._finish_init(inplanes, out, stride, skip, shortcut_norm_layer or norm_layer, attention, se_reduction)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def last_branch_layer(self) -> nn.Module:
        return self.bn3 if not isinstance(self.bn3, nn.Identity) else self.conv3


class PreActBottleneck(_ResidualBlock):
    """``norm -> relu -> conv1x1 -> norm -> relu -> conv3x3 -> norm -> relu -> conv1x1 (x4)``
    [``-> bn_additional`` with DIA] (+ shortcut), no activation after the addition."""

    expansion = 4
    post_activation = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 attention: str = "none", skip: bool = True, se_reduction: int = 16,
                 shortcut_norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        bias = is_identity_norm(norm_layer)
        out = planes * self.expansion
        self.bn1 = norm_layer(inplanes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = _conv(inplanes, planes, 1, 1, bias)
        self.bn2 = norm_layer(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = _conv(planes, planes, 3, stride, bias)
        self.bn3 = norm_layer(planes)
        self.relu3 = nn.ReLU(inplace=False)
        with_extra_bn = attention == "dia"
        self.conv3 = _conv(planes, out, 1, 1, with_extra_bn and bias)
        self.bn_additional = norm_layer(out) if with_extra_bn else None
        # Pre-activation: the next block's leading norm normalises the sum, the projection has none.
        self._finish_init(inplanes, out, stride, skip, None, attention, se_reduction)

    def branch(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out if self.bn_additional is None else self.bn_additional(out)

    def last_branch_layer(self) -> nn.Module:
        if self.bn_additional is not None and not isinstance(self.bn_additional, nn.Identity):
            return self.bn_additional
        return self.conv3


class ResStage(nn.Module):
    """The blocks of one stage, registered as ``"0"``, ``"1"``, ... (indexable, iterable), and with
    ``attention="dia"`` the stage's one shared :class:`DIALSTMCell` as ``dia``.

    DIA: the state starts at zero for each forward of the stage and is carried from block to block;
    each block's residual branch is scaled by the cell's ``h`` (through the block's attention probe)
    before the addition.
    """

    def __init__(self, blocks: list[_ResidualBlock], dia: DIALSTMCell | None = None) -> None:
        super().__init__()
        self._num_blocks = len(blocks)
        for index, block in enumerate(blocks):
            self.add_module(str(index), block)
        self.dia = dia

    def __len__(self) -> int:
        return self._num_blocks

    def __getitem__(self, index: int) -> _ResidualBlock:
        if not -self._num_blocks <= index < self._num_blocks:
            raise IndexError(f"block index {index} out of range for a stage of {self._num_blocks} blocks")
        return getattr(self, str(index % self._num_blocks))

    def __iter__(self) -> Iterator[_ResidualBlock]:
        return (getattr(self, str(i)) for i in range(self._num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        if self.dia is None:
            for block in self:
                x = block(x)
            return x
        state = None
        for block in self:
            branch, identity = block.residual(x)
            z = branch.mean((2, 3))
            if state is None:
                state = self.dia.initial_state(z)
            state = self.dia(z, state)
            attention = block.attention_probe(state[0])
            x = block.merge(branch * attention[:, :, None, None], identity)
        return x


class CifarResNet(nn.Module):
    """A CIFAR ResNet of three stages (see the module docstring for the layout and choices)."""

    def __init__(self, block: type[_ResidualBlock], blocks_per_stage: int, num_classes: int = 10,
                 norm: str = "bn", attention: str = "none", width: float = 1.0, in_channels: int = 3,
                 skip: bool = True, zero_init_residual: bool = False, convert_shortcut_bn: bool = False,
                 se_reduction: int = 16, dia_reduction: int = 4) -> None:
        super().__init__()
        _validate(num_classes=num_classes, norm=norm, attention=attention, width=width, in_channels=in_channels,
                  skip=skip, zero_init_residual=zero_init_residual, convert_shortcut_bn=convert_shortcut_bn,
                  se_reduction=se_reduction, dia_reduction=dia_reduction)
        norm_layer = get_norm_layer(norm)
        shortcut_norm_layer = get_norm_layer("bn" if norm == "iebn" and not convert_shortcut_bn else norm)
        preact = not block.post_activation
        self.norm, self.attention = norm, attention
        stem_width = _scaled(16, width)
        stem = OrderedDict(conv=_conv(in_channels, stem_width, 3, 1, is_identity_norm(norm_layer) and not preact))
        if not preact:
            stem.update(bn=norm_layer(stem_width), relu=nn.ReLU(inplace=False))
        self.stem = nn.Sequential(stem)
        inplanes = stem_width
        for index, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            planes = _scaled(planes, width)
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(block(inplanes, planes, stride if b == 0 else 1, norm_layer, attention, skip,
                                    se_reduction, shortcut_norm_layer=shortcut_norm_layer))
                inplanes = planes * block.expansion
            dia = DIALSTMCell(inplanes, dia_reduction) if attention == "dia" else None
            self.add_module(f"layer{index}", ResStage(blocks, dia))
        if preact:
            self.bn_final = norm_layer(inplanes)
            self.relu_final = nn.ReLU(inplace=False)
        else:
            self.bn_final = self.relu_final = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # SE's 1x1 convolutions are fully connected layers: they keep PyTorch's default init.
        se_convs = {id(c) for m in self.modules() if isinstance(m, SEModule) for c in (m.fc1, m.fc2)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in se_convs:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _ResidualBlock):
                    nn.init.zeros_(m.last_branch_layer().weight)

    def stages(self) -> list[ResStage]:
        return [self.layer1, self.layer2, self.layer3]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.bn_final is not None:
            x = self.relu_final(self.bn_final(x))
        return self.fc(self.avgpool(x).flatten(1))


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; allowed: an integer >= {minimum}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid; allowed: True or False")


def _validate(*, num_classes, norm, attention, width, in_channels, skip, zero_init_residual, convert_shortcut_bn,
              se_reduction, dia_reduction) -> None:
    _check_int("num_classes", num_classes)
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not valid; allowed: {NORMS}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not valid; allowed: {ATTENTIONS}")
    if not isinstance(width, int | float) or isinstance(width, bool) or not 0 < width <= 16:
        raise ValueError(f"width={width!r} is not valid; allowed: a number in (0, 16], 1.0 is the paper's size")
    _check_int("in_channels", in_channels)
    _check_bool("skip", skip)
    _check_bool("zero_init_residual", zero_init_residual)
    _check_bool("convert_shortcut_bn", convert_shortcut_bn)
    _check_int("se_reduction", se_reduction)
    _check_int("dia_reduction", dia_reduction)
    if attention == "dia" and _scaled(16, width) < dia_reduction:
        raise ValueError(f"width={width!r} is too small for attention='dia' with dia_reduction={dia_reduction}: "
                         f"the first stage would have {_scaled(16, width)} channels, fewer than the reduction")


def _builder(name: str, block: type[_ResidualBlock], depth: int):
    per_stage = (depth - 2) // (6 if block is BasicBlock else 9)

    @register_model(name)
    def build(num_classes: int = 10, *, norm: str = "bn", attention: str = "none", width: float = 1.0,
              in_channels: int = 3, skip: bool = True, zero_init_residual: bool = False,
              convert_shortcut_bn: bool = False, se_reduction: int = 16, dia_reduction: int = 4) -> CifarResNet:
        return CifarResNet(block, per_stage, num_classes, norm=norm, attention=attention, width=width,
                           in_channels=in_channels, skip=skip, zero_init_residual=zero_init_residual,
                           convert_shortcut_bn=convert_shortcut_bn, se_reduction=se_reduction,
                           dia_reduction=dia_reduction)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: {'pre-activation bottleneck' if block is PreActBottleneck else block.__name__} "
                     f"CIFAR ResNet of depth {depth} ({per_stage} blocks per stage). Options: see CifarResNet.")
    return build


resnet20 = _builder("resnet20", BasicBlock, 20)
resnet32 = _builder("resnet32", BasicBlock, 32)
resnet56 = _builder("resnet56", BasicBlock, 56)
resnet110 = _builder("resnet110", BasicBlock, 110)
resnet164 = _builder("resnet164", Bottleneck, 164)
preresnet164 = _builder("preresnet164", PreActBottleneck, 164)
