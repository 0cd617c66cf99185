"""What the two peers share with each other (not with dist_cifar): CIFAR-10 as torchvision's
`datasets.CIFAR10` serves it, and the one JSON line each peer prints for peers.py.

`ArrayCIFAR` is torchvision's CIFAR10 minus the pickle reading: the whole uint8 array in memory,
one PIL image per item, then the usual transforms (random crop with 4-pixel padding, flip,
ToTensor, Normalize). The arrays come from dist_cifar's decoder and cache, so the peers read the
very images dist_cifar trains on (the JPEG CIFAR-10 here has no official pickles to give
torchvision).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_cifar.data import CIFAR_MEAN, CIFAR_STD, load_source  # noqa: E402


class ArrayCIFAR(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.numpy(), labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def train_set(dataset: str, data_dir: str) -> ArrayCIFAR:
    raw = load_source(dataset, data_dir, download=False, synthetic_size=4096)
    augment = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    return ArrayCIFAR(raw.train_x, raw.train_y, augment)


def add_common_args(parser) -> None:
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="imagefolder")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps, after as many warm-up steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--num-workers", type=int, default=2)


def emit(contestant: str, images_per_s: float, timed_steps: int, last_loss: float, **extra) -> None:
    """The one line peers.py parses out of rank 0's stdout."""
    print("PEER_RESULT " + json.dumps(dict(contestant=contestant, images_per_s=images_per_s,
                                           timed_steps=timed_steps, last_loss=last_loss, **extra)), flush=True)
