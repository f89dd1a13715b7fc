"""The DenseNet family (Huang et al., CVPR 2017) in pure torch.

    python -m densenet_ray.model                      # every architecture: depth, k, params, GMACs
    python -m densenet_ray.model densenet121 --json

    from densenet_ray.model import build
    net = build("densenet121", num_classes=1000)                      # Table 1, torchvision keys
    net = build("densenet_bc100_k12", num_classes=10, drop_rate=0.2)  # Table 2
    net = build("densenet_bc", depth=64, growth_rate=16, compression=0.75, num_classes=10)

Layout and state-dict keys follow torchvision's `densenet.py` (`features.denseblock1.denselayer1.
conv1.weight`, ...), so torchvision's ImageNet weights load with `strict=True` and ours load there.
Every dense layer concatenates the list of earlier feature maps itself; that is what lets the
memory-efficient mode (Pleiss et al., 2017; `efficient.py`) recompute the concatenation and its
BN-ReLU in the backward pass instead of storing them, so feature-map memory grows linearly with depth.

In a layer, `conv1` always reads the concatenated input: the 1x1 bottleneck of DenseNet-B
(`norm1-relu1-conv1` then `norm2-relu2-conv2` 3x3), or the single 3x3 conv of a plain DenseNet.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_ray.efficient import Stage, bn_relu_conv_chain

# ImageNet models (Table 1): DenseNet-BC, k=32 (161: k=48), 4 blocks, stem of 2k filters.
IMAGENET_ARCHS = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16)),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24)),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32)),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32)),
    "densenet264": dict(growth_rate=32, block_config=(6, 12, 64, 48)),
}
# CIFAR/SVHN models (Table 2), named densenet{L}_k{k} and densenet_bc{L}_k{k}; any valid depth
# and growth rate of that form builds, these six are the paper's.
CIFAR_ARCHS = (
    "densenet40_k12", "densenet100_k12", "densenet100_k24",
    "densenet_bc100_k12", "densenet_bc250_k24", "densenet_bc190_k40",
)
ARCHS = (*IMAGENET_ARCHS, *CIFAR_ARCHS)
_CIFAR_NAME = re.compile(r"densenet(_bc)?(\d+)_k(\d+)$")


class _DenseLayer(nn.Module):
    """H_l: BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k) (DenseNet-B), or BN-ReLU-Conv3x3(k)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        width = bn_size * growth_rate if bn_size else growth_rate
        kernel = 1 if bn_size else 3
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, width, kernel, padding=kernel // 2, bias=False)
        if bn_size:
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        self.bottleneck = bool(bn_size)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def function(self, *features: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        # Dropout after each convolution, as in the paper (section 4.2); off unless drop_rate > 0.
        out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate else out
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
            out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate else out
        return out

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and _needs_grad(self, features):
            stages = [Stage(self.norm1, self.conv1, self.drop_rate)]
            if self.bottleneck:
                stages.append(Stage(self.norm2, self.conv2, self.drop_rate))
            return bn_relu_conv_chain(stages, features)
        return self.function(*features)


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate,
                                memory_efficient)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to floor(theta * m) maps, then 2x2 average pooling."""

    def __init__(self, num_input_features: int, num_output_features: int, drop_rate: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def function(self, x: Tensor) -> Tensor:
        out = self.conv(self.relu(self.norm(x)))
        return F.dropout(out, self.drop_rate, self.training) if self.drop_rate else out

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and _needs_grad(self, [x]):
            return self.pool(bn_relu_conv_chain([Stage(self.norm, self.conv, self.drop_rate)], [x]))
        return self.pool(self.function(x))


def _needs_grad(module: nn.Module, inputs: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and (any(t.requires_grad for t in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


class DenseNet(nn.Module):
    """DenseNet with every knob the paper varies.

    growth_rate: k, feature maps each layer adds.
    block_config: layers per dense block (4 blocks for ImageNet, 3 equal ones for CIFAR/SVHN).
    num_init_features: stem filters; None = 2k (ImageNet, and DenseNet-BC on CIFAR), else 16.
    bottleneck: DenseNet-B, a 1x1 conv to bn_size*k maps before each 3x3 conv.
    compression: theta in (0, 1]; transitions keep floor(theta * m) of m maps (DenseNet-C if < 1).
    drop_rate: dropout after each conv but the first (the paper's 0.2 without augmentation).
    stem: "imagenet" (7x7/2 conv + BN-ReLU + 3x3/2 max pool) or "cifar" (one 3x3 conv).
    memory_efficient: recompute concatenations in backward (same outputs, linear memory).
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int | None = None, bottleneck: bool = True, bn_size: int = 4,
                 compression: float = 0.5, drop_rate: float = 0.0, num_classes: int = 1000,
                 in_channels: int = 3, stem: str = "imagenet", memory_efficient: bool = False) -> None:
        super().__init__()
        _check_arguments(growth_rate, block_config, compression, drop_rate, num_classes, in_channels, stem)
        if num_init_features is None:
            num_init_features = 2 * growth_rate if stem == "imagenet" or (bottleneck and compression < 1) else 16
        if stem == "imagenet":
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]))
        else:  # CIFAR/SVHN: the first dense layer's own BN-ReLU follows the stem conv.
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False)),
            ]))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size if bottleneck else 0, growth_rate,
                                drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(math.floor(compression * num_features))
                if out_features < 1:  # torch would build it, and fail only on the first batch
                    raise ValueError(f"invalid DenseNet arguments: compression={compression!r} keeps "
                                     f"floor({compression!r} x {num_features}) = 0 of the {num_features} feature maps "
                                     f"after dense block {i + 1}: raise compression or growth_rate")
                transition = _Transition(num_features, out_features, drop_rate, memory_efficient)
                self.features.add_module(f"transition{i + 1}", transition)
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))  # torchvision's name, any depth
        self.classifier = nn.Linear(num_features, num_classes)

        self.growth_rate, self.block_config, self.bottleneck = growth_rate, tuple(block_config), bottleneck
        self.compression, self.stem = compression, stem
        self.depth = sum(block_config) * (2 if bottleneck else 1) + len(block_config) + 1
        self.input_size = 224 if stem == "imagenet" else 32  # native resolution, pixels
        self.in_channels = in_channels

        # He initialisation (He et al., 2015), as the paper and its reference code (fb.resnet.torch).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def _check_arguments(growth_rate, block_config, compression, drop_rate, num_classes, in_channels, stem):
    problems = []
    if not (isinstance(growth_rate, int) and growth_rate >= 1):
        problems.append(f"growth_rate={growth_rate!r} (a positive integer, e.g. 12, 24, 32)")
    if not (block_config and all(isinstance(n, int) and n >= 1 for n in block_config)):
        problems.append(f"block_config={block_config!r} (positive layer counts, e.g. (6, 12, 24, 16))")
    if not 0 < compression <= 1:
        problems.append(f"compression={compression!r} (theta in (0, 1]; 1 keeps every feature map)")
    if not 0 <= drop_rate < 1:
        problems.append(f"drop_rate={drop_rate!r} (in [0, 1))")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        problems.append(f"num_classes={num_classes!r} (a positive integer)")
    if not (isinstance(in_channels, int) and in_channels >= 1):
        problems.append(f"in_channels={in_channels!r} (1 for grayscale, 3 for RGB)")
    if stem not in ("imagenet", "cifar"):
        problems.append(f"stem={stem!r} ('imagenet' or 'cifar')")
    if problems:
        raise ValueError("invalid DenseNet arguments: " + "; ".join(problems))


def cifar_blocks(depth: int, bottleneck: bool) -> tuple[int, int, int]:
    """Three equal dense blocks for a CIFAR/SVHN DenseNet of total depth L (section 3)."""
    convs_per_layer = 2 if bottleneck else 1
    per_block, rest = divmod(depth - 4, 3 * convs_per_layer)
    if rest or per_block < 1:
        kind = "DenseNet-BC" if bottleneck else "DenseNet"
        step = 3 * convs_per_layer
        raise ValueError(f"depth={depth} is not valid for a 3-block {kind}: (L - 4) must be a positive multiple "
                         f"of {step}, e.g. {', '.join(str(4 + step * n) for n in (2, 4, 16))}")
    return (per_block,) * 3


def densenet_cifar(depth: int, growth_rate: int, bottleneck: bool = True, compression: float = 0.5,
                   **kwargs) -> DenseNet:
    """Any CIFAR/SVHN DenseNet(-B/-C/-BC) of depth L and growth rate k."""
    return DenseNet(growth_rate=growth_rate, block_config=cifar_blocks(depth, bottleneck), bottleneck=bottleneck,
                    compression=compression, stem="cifar", **kwargs)


def arch_kwargs(arch: str) -> dict:
    """The DenseNet keyword arguments behind an architecture name."""
    if arch in IMAGENET_ARCHS:
        return dict(IMAGENET_ARCHS[arch], bottleneck=True, compression=0.5, stem="imagenet")
    match = _CIFAR_NAME.fullmatch(arch)
    if match:
        bc, depth, k = bool(match[1]), int(match[2]), int(match[3])
        return dict(depth=depth, growth_rate=k, bottleneck=bc, compression=0.5 if bc else 1.0, stem="cifar")
    if arch in ("densenet", "densenet_bc"):  # the general CIFAR builder: pass depth and growth_rate
        bc = arch == "densenet_bc"
        return dict(bottleneck=bc, compression=0.5 if bc else 1.0, stem="cifar")
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}, or densenet{{L}}_k{{k}} / "
                     f"densenet_bc{{L}}_k{{k}} for any valid CIFAR depth L and growth rate k")


def build(arch: str, num_classes: int = 1000, **overrides) -> DenseNet:
    """Build `arch` (see ARCHS) with any DenseNet argument overridden, e.g. growth_rate=24,
    compression=0.75, memory_efficient=True, drop_rate=0.2, in_channels=1. CIFAR-stem models also
    take depth=L (three equal blocks)."""
    kwargs = {**arch_kwargs(arch), **overrides, "num_classes": num_classes}
    depth = kwargs.pop("depth", None)
    if kwargs["stem"] == "cifar" and "block_config" not in overrides:
        if depth is None or "growth_rate" not in kwargs:
            raise ValueError(f"{arch!r} needs depth=L and growth_rate=k, e.g. build({arch!r}, depth=100, "
                             f"growth_rate=12, num_classes=10)")
        kwargs["block_config"] = cifar_blocks(depth, kwargs["bottleneck"])
    elif depth is not None and kwargs["stem"] == "imagenet":
        raise ValueError(f"depth={depth} cannot be set on the ImageNet model {arch!r}: choose block_config "
                         f"(e.g. (6, 12, 32, 32) for 169 layers) or another arch")
    return DenseNet(**kwargs)


def from_config(cfg, num_classes: int, in_channels: int, *, inference: bool = False) -> DenseNet:
    """The DenseNet a training configuration describes (config.TrainConfig, or anything with its
    arch and model_overrides): the one place a config becomes a network. `inference`: without what
    changes nothing in eval mode (dropout, the memory-efficient backward)."""
    return build(cfg.arch, num_classes=num_classes, in_channels=in_channels, **cfg.model_overrides(inference=inference))


def count_macs(model: nn.Module, input_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass on a single image, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    size = input_size or model.input_size
    param = next(model.parameters())
    x = torch.zeros(1, model.in_channels, size, size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2  # a MAC is one multiply and one add


def summary(arch: str, **overrides) -> dict:
    """Name, depth, growth rate, parameters and GMACs at the native input size (no weights allocated)."""
    with torch.device("meta"):
        model = build(arch, **overrides)
    return {
        "arch": arch,
        "depth": model.depth,
        "growth_rate": model.growth_rate,
        "bottleneck": model.bottleneck,
        "compression": model.compression,
        "block_config": list(model.block_config),
        "params": sum(p.numel() for p in model.parameters()),
        "input_size": model.input_size,
        "gmacs": count_macs(model) / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m densenet_ray.model", description=__doc__.split("\n")[0])
    parser.add_argument("archs", nargs="*", metavar="ARCH", help=f"default: all of {', '.join(ARCHS)}")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: 1000 for ImageNet models, 10 for CIFAR ones)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    rows = []
    for arch in args.archs or ARCHS:
        try:
            classes = args.num_classes or (1000 if arch in IMAGENET_ARCHS else 10)
            rows.append(summary(arch, num_classes=classes))
        except ValueError as err:
            parser.error(str(err))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'arch':<22}{'depth':>6}{'k':>4}{'theta':>7}{'params':>14}{'input':>7}{'GMACs':>9}")
    for r in rows:
        print(f"{r['arch']:<22}{r['depth']:>6}{r['growth_rate']:>4}{r['compression']:>7.2f}{r['params']:>14,}"
              f"{r['input_size']:>7}{r['gmacs']:>9.3f}")


if __name__ == "__main__":
    main()
