"""The report's five CIFAR-10 models (docs/report_protocol.md) and the name -> builder registry.

All take (N, 3, 32, 32) float images and return (N, 10) logits.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NUM_CLASSES = 10


class LinearClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class SimpleCNN(nn.Module):
    """conv 3->18, ReLU, maxpool 2/2, FC 4608->64, ReLU, FC 64->10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 18, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(18 * 16 * 16, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class SmallCNN(nn.Module):
    """The report's default model, with its three ablation switches.

    conv1 3->16, ReLU, pool; [BN(16)], conv2 16->16, ReLU, [Dropout 0.35], pool; FC ->64->10.
    """

    def __init__(self, batchnorm: bool = True, dropout: bool = True, pooling: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.dropout = nn.Dropout(0.35) if dropout else nn.Identity()
        self.pool = nn.MaxPool2d(2, 2) if pooling else nn.Identity()
        side = 8 if pooling else 32
        self.flattened_size = 16 * side * side
        self.fc1 = nn.Linear(self.flattened_size, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(self.dropout(torch.relu(self.conv2(self.bn1(x)))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def vgg_features(widths: list[int], convs_per_block: list[int], pool_strides: list[int]) -> nn.Sequential:
    """VGG blocks as the report adapts them: conv+ReLU repeated, BN at the block's end,
    Dropout2d(0.05) after the first block's BN, then a 2x2 max-pool with the given stride."""
    layers: list[nn.Module] = []
    in_ch = 3
    for block, (width, n_convs, stride) in enumerate(zip(widths, convs_per_block, pool_strides)):
        for _ in range(n_convs):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = width
        layers.append(nn.BatchNorm2d(width))
        if block == 0:
            layers.append(nn.Dropout2d(0.05))
        layers.append(nn.MaxPool2d(2, stride))
    return nn.Sequential(*layers)


class VGGTruncated(nn.Module):
    """Three VGG blocks (64, 128, 256) -> 256x4x4 -> FC 4096->1024->512->10."""

    def __init__(self):
        super().__init__()
        self.conv_layer = vgg_features([64, 128, 256], [2, 2, 2], [2, 2, 2])
        self.flattened_size = 256 * 4 * 4
        classifier = [nn.Dropout(0.1), nn.Linear(self.flattened_size, 1024), nn.ReLU(inplace=True),
                      nn.Linear(1024, 512), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(512, NUM_CLASSES)]
        self.fc_layer = nn.Sequential(*classifier)

    def forward(self, x):
        return self.fc_layer(torch.flatten(self.conv_layer(x), 1))


class VGG16CIFAR(nn.Module):
    """The report's adapted VGG16: pools of stride 1 after blocks 2-5 keep a 12x12 map,
    so the first FC layer is 73728->4096 (90.7% of the 332,943,818 parameters)."""

    def __init__(self):
        super().__init__()
        self.conv_layer = vgg_features([64, 128, 256, 512, 512], [2, 2, 2, 3, 3], [2, 1, 1, 1, 1])
        self.flattened_size = 512 * 12 * 12
        classifier = [nn.Dropout(0.1), nn.Linear(self.flattened_size, 4096), nn.ReLU(inplace=True),
                      nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, NUM_CLASSES)]
        self.fc_layer = nn.Sequential(*classifier)

    def forward(self, x):
        return self.fc_layer(torch.flatten(self.conv_layer(x), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearClassifier,
    "simple_cnn": SimpleCNN,
    "small_cnn": SmallCNN,
    "vgg_truncated": VGGTruncated,
    "vgg16_cifar": VGG16CIFAR,
}


BUILT_IN = tuple(MODELS)


def register(name: str, builder: Callable[[], nn.Module]) -> None:
    """Add a model of one's own: `builder()` returns a fresh nn.Module taking (N, 3, 32, 32) images
    and returning (N, 10) logits. Then --model NAME (or dist_cifar.run(model=NAME)) trains it in
    this process under every design it allows: ddp and fsdp take any model; the hybrid refuses,
    with one line, a classifier it cannot shard (it needs two Linear layers joined by elementwise
    ops). The report's models cannot be replaced."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is one of the report's models; register yours under another name")
    if not callable(builder):
        raise TypeError("register(name, builder): builder must be callable, returning an nn.Module")
    MODELS[name] = builder


def build_model(name: str, batchnorm: bool = True, dropout: bool = True, pooling: bool = True) -> nn.Module:
    """A registered model (config validation has already refused unknown names)."""
    if name == "small_cnn":
        return SmallCNN(batchnorm=batchnorm, dropout=dropout, pooling=pooling)
    return MODELS[name]()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
