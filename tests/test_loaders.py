"""dist_cifar/loaders.py: the device-resident loader and the DataLoader path follow DistributedSampler exactly; augmentation; exact eval shards."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from dist_cifar.data import Split
from dist_cifar.loaders import crop_flip, LoaderSpec, sampler_indices, TensorLoader, TorchLoader
from dist_cifar import data as D


def test_sampler_shards_are_disjoint_and_cover_the_data():
    n = 1001
    e0 = [sampler_indices(n, r, 2, seed=42, epoch=0) for r in range(2)]
    assert not set(e0[0]) & set(e0[1])
    assert len(set(e0[0]) | set(e0[1])) == n - n % 2  # drop_last remainder only
    e1 = [sampler_indices(n, r, 2, seed=42, epoch=1) for r in range(2)]
    assert e1[0] != e0[0]  # reshuffled each epoch
    assert sampler_indices(n, 0, 2, seed=42, epoch=1) == e1[0]  # reproducible with the seed
    assert sampler_indices(n, 0, 2, seed=43, epoch=1) != e1[0]
    # the tensor loader walks exactly that sequence
    split = Split(torch.zeros(n, 32, 32, 3, dtype=torch.uint8), torch.arange(n))
    for rank in range(2):
        loader = TensorLoader(split, torch.device("cpu"), LoaderSpec(64, rank=rank, world=2, seed=42))
        loader.set_epoch(1)
        labels = torch.cat([y for _, y in loader.batches()]).tolist()
        assert labels == e1[rank][: len(labels)] and len(labels) == 7 * 64


@pytest.mark.quick
def test_eval_batches_are_never_padded_past_the_split():
    """Case 120: --eval-batch-size 100000 on 640 images ran 100,000-row batches (15 GB)."""
    from dist_cifar import distributed as dist_info
    from dist_cifar.assembly import assemble
    from dist_cifar.config import make_config
    split = Split(torch.zeros(640, 32, 32, 3, dtype=torch.uint8), torch.zeros(640, dtype=torch.long))
    run = assemble(make_config(batch_size=32, eval_batch_size=100_000), dist_info.DistInfo(),
                   D.make_splits(D.make_synthetic(128), "full"))
    batches = list(run.shards(split).batches())
    assert len(batches) == 1 and batches[0][0].shape[0] == 640


CPU = torch.device("cpu")


def position_image() -> torch.Tensor:
    """A 32x32 image whose pixels say where they are: R = row + 1, G = col + 1, B = 200."""
    r = torch.arange(32).view(32, 1).expand(32, 32) + 1
    c = torch.arange(32).view(1, 32).expand(32, 32) + 1
    return torch.stack([r, c, torch.full((32, 32), 200)], -1).to(torch.uint8)


def decode(crop: torch.Tensor) -> tuple[int, int, bool]:
    """(dy, dx, flipped) such that crop == that crop of the zero-padded image, else AssertionError."""
    padded = torch.nn.functional.pad(position_image(), (0, 0, 4, 4, 4, 4))
    for dy in range(9):
        for dx in range(9):
            window = padded[dy:dy + 32, dx:dx + 32]
            if torch.equal(window, crop):
                return dy, dx, False
            if torch.equal(window.flip(1), crop):
                return dy, dx, True
    raise AssertionError("not a crop/flip of the padded image")


@pytest.mark.quick
def test_crop_flip_on_a_known_image():
    batch = position_image().unsqueeze(0).repeat(256, 1, 1, 1)
    out = crop_flip(batch, torch.Generator().manual_seed(0))
    params = [decode(img) for img in out]
    assert len({p[:2] for p in params}) > 40  # offsets spread over the 9x9 grid
    flips = sum(p[2] for p in params)
    assert 80 < flips < 176  # about half flipped
    assert {p[0] for p in params} == set(range(9)) and {p[1] for p in params} == set(range(9))


@pytest.mark.quick
def test_tensor_loader_augmentation_per_epoch_and_seed():
    split = Split(position_image().unsqueeze(0).repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long))

    def epoch_batches(seed, epoch, rank=0):
        spec = LoaderSpec(16, mean=(0.0,) * 3, std=(1 / 255,) * 3, rank=rank, seed=seed, augment=True)
        loader = TensorLoader(split, CPU, spec)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader.batches()])

    a0, a1 = epoch_batches(1, 0), epoch_batches(1, 1)
    assert not torch.equal(a0, a1)  # differ between epochs
    assert torch.equal(a0, epoch_batches(1, 0))  # repeat with the seed
    assert not torch.equal(a0, epoch_batches(2, 0))
    # the normaliser with mean 0, std 1/255 gives back the uint8 values: decode each one
    for img in a0[:8]:
        decode(img.permute(1, 2, 0).round().to(torch.uint8))


@pytest.mark.quick
def test_loaders_follow_distributed_sampler_exactly():
    n = 203
    split = Split(torch.zeros(n, 32, 32, 3, dtype=torch.uint8), torch.arange(n))
    for world in (1, 2, 3):
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
            sampler.set_epoch(3)
            expected = list(sampler)
            for cls in (TensorLoader, TorchLoader):
                loader = cls(split, CPU, LoaderSpec(8, rank=rank, world=world, seed=5, num_workers=0))
                loader.set_epoch(3)
                seen = torch.cat([y for _, y in loader.batches()]).tolist()
                assert seen == expected[: len(seen)] and len(seen) == (len(expected) // 8) * 8
