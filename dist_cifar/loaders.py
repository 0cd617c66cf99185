"""Batches on the training device: the device-resident loader, the DataLoader path, eval shards.

Training loaders follow DistributedSampler's exact index sequence (shuffle with the seed,
`set_epoch`, drop_last), so every rank runs the same number of full batches and the two
loaders see the same images in the same order. Both yield normalised float NCHW batches.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .data import Split

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LoaderSpec:
    """How one rank batches a split; built once per run by the assembler."""

    batch_size: int                  # per process
    mean: tuple = (0.5, 0.5, 0.5)    # normalisation, per channel, in [0, 1] units
    std: tuple = (0.5, 0.5, 0.5)
    rank: int = 0                    # this process's shard ...
    world: int = 1                   # ... of this many
    seed: int = 0                    # shuffling (all ranks) and augmentation (mixed with the rank)
    augment: bool = False            # random crop (4-pixel padding) + horizontal flip
    channels_last: bool = False
    steps_cap: int = 0               # training steps per epoch at most (0: a full pass)
    num_workers: int = 2             # torch loader only


def sampler_indices(n: int, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """This rank's training indices for an epoch: DistributedSampler's, computed, not copied."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def steps_in_epoch(n: int, world: int, batch_size: int, cap: int = 0) -> int:
    steps = (n // world) // batch_size  # DistributedSampler(drop_last) gives each rank n // world
    return min(steps, cap) if cap else steps


class Normalizer:
    """uint8 NHWC -> float NCHW normalised, optionally channels_last, on the batch's device."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        std_t = torch.tensor(std, device=device)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self.neg_shift = (-torch.tensor(mean, device=device) / std_t).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images_nhwc_uint8: torch.Tensor) -> torch.Tensor:
        n, h, w, c = images_nhwc_uint8.shape
        out = torch.empty((n, c, h, w), device=images_nhwc_uint8.device, memory_format=self.memory_format)
        out.copy_(images_nhwc_uint8.permute(0, 3, 1, 2))  # layout change and uint8->float in one pass
        return out.mul_(self.scale).add_(self.neg_shift)


def pack_padded(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """uint8 NHWC (C <= 4) -> int32 (N, (H+2pad) * (W+2pad)): zero-padded, one int32 per pixel,
    so a crop is a gather of whole pixels rather than of bytes."""
    n, h, w, c = images.shape
    return torch.nn.functional.pad(images, (0, 4 - c, pad, pad, pad, pad)).view(torch.int32).view(n, -1)


def crop_flip_packed(pixels: torch.Tensor, shape: tuple[int, int, int], generator: torch.Generator, *,
                     pad: int = 4) -> torch.Tensor:
    """Random crop + random horizontal flip of packed padded pixels -> uint8 (N, h, w, c):
    one gather for the whole batch, no per-image Python work. `shape` is the unpadded (h, w, c)."""
    h, w, c = shape
    n, dev, width = pixels.shape[0], pixels.device, w + 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = (dy[:, None] + ar_h) * width
    cols = torch.where(flip[:, None], dx[:, None] + (w - 1 - ar_w), dx[:, None] + ar_w)
    index = (rows[:, :, None] + cols[:, None, :]).view(n, h * w)
    return torch.gather(pixels, 1, index).view(torch.uint8).view(n, h, w, 4)[..., :c]


def crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after `pad` pixels of zero padding, and a random horizontal flip, of a uint8
    NHWC batch."""
    _, h, w, c = images.shape
    return crop_flip_packed(pack_padded(images, pad), (h, w, c), generator, pad=pad)


def batch_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """Augmentation seed per (rank, epoch, step): ranks differ, and a resumed epoch replays the
    same crops and flips from any step without carrying generator state."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729 + step * 15_485_863) % (2**63 - 1)


class TensorLoader:
    """The whole uint8 split lives on the training device; batches are gathered, augmented and
    normalised there. On a GPU the loop never waits for a host worker or a copy."""

    def __init__(self, split: Split, device: torch.device, spec: LoaderSpec):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        # augmenting: keep the padded, pixel-packed copy instead (1.6x the bytes, no per-batch pad)
        self.packed = pack_padded(self.x) if spec.augment else None
        if spec.augment:
            self.x = None
        self.shape = tuple(split.x.shape[1:])
        self.device, self.spec, self.batch_size = device, spec, spec.batch_size
        self.normalize = Normalizer(spec.mean, spec.std, device, spec.channels_last)
        self.generator = torch.Generator(device=device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return steps_in_epoch(len(self.y), self.spec.world, self.batch_size, self.spec.steps_cap)

    def indices(self) -> torch.Tensor:
        idx = sampler_indices(len(self.y), self.spec.rank, self.spec.world, self.spec.seed, self.epoch)
        return torch.tensor(idx[: len(self) * self.batch_size], dtype=torch.long).to(self.device)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        idx = self.indices()
        for step in range(start_step, len(self)):
            sel = idx[step * self.batch_size:(step + 1) * self.batch_size]
            if self.spec.augment:
                self.generator.manual_seed(batch_seed(self.spec.seed, self.spec.rank, self.epoch, step))
                images = crop_flip_packed(self.packed.index_select(0, sel), self.shape, self.generator)
            else:
                images = self.x.index_select(0, sel)  # much faster than x[sel] for uint8 rows
            yield self.normalize(images), self.y.index_select(0, sel)


class ArrayDataset(Dataset):
    def __init__(self, split: Split, transform):
        self.x, self.y, self.transform = split.x.permute(0, 3, 1, 2), split.y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


class TorchLoader:
    """torchvision transforms + DataLoader (workers, pinned memory) over DistributedSampler.
    Resuming mid-epoch skips the first batches (they are still loaded, not trained on)."""

    def __init__(self, split: Split, device: torch.device, spec: LoaderSpec):
        from torchvision.transforms import v2
        ops = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if spec.augment else []
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
        self.sampler = DistributedSampler(range(len(split)), num_replicas=spec.world, rank=spec.rank,
                                          shuffle=True, seed=spec.seed, drop_last=True)
        self.loader = DataLoader(
            ArrayDataset(split, v2.Compose(ops)), batch_size=spec.batch_size, sampler=self.sampler,
            drop_last=True, num_workers=spec.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=spec.num_workers > 0,
            generator=torch.Generator().manual_seed(spec.seed + 7_919 * spec.rank),
        )
        self.device, self.steps_cap, self.batch_size = device, spec.steps_cap, spec.batch_size
        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return min(len(self.loader), self.steps_cap) if self.steps_cap else len(self.loader)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        for x, y in itertools.islice(self.loader, start_step, len(self)):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


class EvalShards:
    """Exact distributed evaluation: rank r takes the r-th contiguous slice of the split, no
    duplicates, so summed counts equal a single process's. Every batch has `batch_size` rows:
    the last one is padded with zero images whose outputs the caller drops (the labels cover
    the real rows only), so a compiled model sees one shape and never recompiles.

    `lockstep`: every rank yields as many batches as the largest slice needs (the extra ones all
    padding, with no labels), for models whose forward is a collective (a sharded head, FSDP)."""

    def __init__(self, split: Split, device: torch.device, spec: LoaderSpec, *, lockstep: bool = False):
        part = torch.tensor_split(torch.arange(len(split)), spec.world)[spec.rank]
        self.x = split.x[part].to(device)
        self.y = split.y[part].to(device)
        largest = -(-len(split) // spec.world)  # tensor_split's first slice is the largest
        # never padded past the largest slice: --eval-batch-size 100000 on 640 images is 640 rows
        self.batch_size = max(min(spec.batch_size, largest), 1)
        self.normalize = Normalizer(spec.mean, spec.std, device, spec.channels_last)
        self.count = -(-(largest if lockstep else len(self.y)) // self.batch_size)

    def __len__(self) -> int:
        return self.count

    def batches(self) -> Iterator[Batch]:
        for start in range(0, self.count * self.batch_size, self.batch_size):
            images = self.x[start:start + self.batch_size]
            if images.shape[0] < self.batch_size:
                pad = images.new_zeros((self.batch_size - images.shape[0], *images.shape[1:]))
                images = torch.cat([images, pad])
            yield self.normalize(images), self.y[start:start + self.batch_size]


def build_train_loader(kind: str, split: Split, device: torch.device, spec: LoaderSpec, accum: int = 1):
    """`tensor`: the device-resident loader; `torch`: torchvision transforms + DataLoader; both
    yield one optimizer step's micro-batches at a time (`accum` of them)."""
    micro = dataclasses.replace(spec, steps_cap=spec.steps_cap * accum)  # the cap counts optimizer steps
    return StepBatches((TensorLoader if kind == "tensor" else TorchLoader)(split, device, micro), accum)


class StepBatches:
    """A loader's batches grouped `accum` at a time: one optimizer step's micro-batches. Its
    length and positions count optimizer steps; a micro-batch of B images after B x `accum`
    consecutive ones of the sampler is what a batch of B x `accum` would hold."""

    def __init__(self, micro, accum: int):
        self.micro, self.accum = micro, accum
        self.batch_size = micro.batch_size * accum  # images per rank per optimizer step

    def set_epoch(self, epoch: int) -> None:
        self.micro.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.micro) // self.accum

    def batches(self, start_step: int = 0) -> Iterator[list[Batch]]:
        micro = self.micro.batches(start_step * self.accum)
        for _ in range(start_step, len(self)):
            yield [next(micro) for _ in range(self.accum)]
