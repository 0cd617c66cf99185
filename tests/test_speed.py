"""Precision policies, memory formats, torch.compile, the device-resident loader, comm hooks, cost."""
import json

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import read_jsonl, run_torchrun, smoke_args
from dist_cifar import distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.config import make_config
from dist_cifar.cost import measure
from dist_cifar.data import Split, make_splits, make_synthetic
from dist_cifar.engine import EpochStart, StepHooks, train_epoch
from dist_cifar.loaders import LoaderSpec, TensorLoader, TorchLoader, crop_flip
from dist_cifar.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits():
    return make_splits(make_synthetic(256), "full")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_finite_steps_that_lower_the_loss(splits, precision):
    cfg = make_config(model="small_cnn", precision=precision, batch_size=32, steps_per_epoch=6, augment=True,
                      optimizer="adam", lr=3e-3)
    run = assemble(cfg, D.DistInfo(), splits)
    assert run.precision.name == precision and (run.precision.scaler is not None) == (precision == "fp16")
    before = [p.detach().clone() for p in run.model.module.parameters()]
    losses = []
    for epoch in range(3):  # the same 6 batches' worth of data, three passes: the loss must fall
        run.loader.set_epoch(epoch)
        result = train_epoch(run.step_parts, run.loader, D.DistInfo(), EpochStart(epoch), StepHooks(record_step_losses=True))
        assert result.steps == 6 and len(result.step_losses) == 6
        assert all(torch.isfinite(torch.tensor(result.step_losses)))
        losses.append(sum(result.step_losses) / 6)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(a, b) for a, b in zip(before, run.model.module.parameters()))


def test_channels_last_matches_nchw():
    torch.manual_seed(0)
    model = build_model("vgg_truncated").eval()
    x = torch.randn(8, 3, 32, 32)
    ref = model(x)
    cl_model = build_model("vgg_truncated").eval()
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)
    out = cl_model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)


def test_compiled_matches_eager():
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    x = torch.randn(16, 3, 32, 32)
    compiled = torch.compile(model, dynamic=False)
    assert torch.allclose(model(x), compiled(x), atol=1e-4, rtol=1e-4)


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


def test_crop_flip_on_a_known_image():
    batch = position_image().unsqueeze(0).repeat(256, 1, 1, 1)
    out = crop_flip(batch, torch.Generator().manual_seed(0))
    params = [decode(img) for img in out]
    assert len({p[:2] for p in params}) > 40  # offsets spread over the 9x9 grid
    flips = sum(p[2] for p in params)
    assert 80 < flips < 176  # about half flipped
    assert {p[0] for p in params} == set(range(9)) and {p[1] for p in params} == set(range(9))


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


@pytest.mark.parametrize("hook", ["fp16", "bf16"])
def test_comm_hooks_under_two_process_torchrun(tmp_path, hook):
    out = tmp_path / "run"
    proc = run_torchrun(2, smoke_args(out, ["--epochs", "3", "--synthetic-size", "512", "--ddp-comm-hook", hook]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(m["comm_s"] > 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # compressed gradients still train
    assert json.loads((out / "config.json").read_text())["ddp_comm_hook"] == hook


def test_cost_of_vgg16_cifar():
    cost = measure("vgg16_cifar")
    assert cost.params == 332_943_818
    assert abs(cost.train_flops_per_image / 1e9 - 17.8) <= 0.1
    assert cost.param_groups["linear fc_layer.1 (73728->4096)"] == 73728 * 4096 + 4096
    assert cost.grad_bytes_fp32 == 4 * 332_943_818
