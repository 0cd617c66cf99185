"""dist_cifar/engine.py: precisions, channels_last, compile, the non-finite guard and fp16 skip counting in the step loop."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import run_train, smoke_args
from dist_cifar import checkpoint as ckpt, distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.config import make_config
from dist_cifar.data import make_splits, make_synthetic
from dist_cifar.engine import EpochStart, NonFiniteLoss, StepHooks, train_epoch
from dist_cifar.models import build_model


@pytest.mark.quick
def test_nan_between_guard_steps_is_caught_and_never_checkpointed(tmp_path):
    """--guard-every 25 with 8 steps an epoch: only step 0 of each epoch is a guard step. A NaN at
    global step 10 (epoch 1, step 2) is applied by the optimizer; the end-of-epoch check must stop
    the run before epoch 1's checkpoint, and say that steps were applied."""
    out = tmp_path / "run"
    proc = run_train(smoke_args(out, ["--epochs", "3", "--guard-every", "25"]), DIST_CIFAR_FAULT="nan:rank=0:step=10")
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "first at epoch 1 step 2" in line[0] and "applied" in line[0], proc.stderr
    assert "stopped before" not in line[0]
    assert [p.name for p in ckpt.committed(out)] == ["ckpt-e0001-s0000000.pt"]
    for path in ckpt.committed(out):
        weights = ckpt.load(path)["model"]
        assert all(torch.isfinite(t.float()).all() for t in weights.values())


@pytest.mark.quick
def test_fp16_overflow_counter_counts_skipped_steps():
    """Ten steps that all overflow (a huge initial loss scale), --max-skipped-steps 3 and
    --guard-every 25: counting guard intervals would never stop; counting steps stops at the
    epoch-end check with the true count."""
    cfg = make_config(precision="fp16", batch_size=16, steps_per_epoch=10, max_skipped_steps=3, guard_every=25)
    run = assemble(cfg, D.DistInfo(), make_splits(make_synthetic(256), "full"))
    run.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    before = [p.detach().clone() for p in run.model.module.parameters()]
    hooks = StepHooks(guard_every=25, max_skipped_steps=3)
    with pytest.raises(NonFiniteLoss, match=r"^10 fp16 overflow"):
        train_epoch(run.step_parts, run.loader, D.DistInfo(), EpochStart(0), hooks)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.module.parameters()))  # all skipped


def test_compiled_run_does_not_recompile_for_uneven_eval_batches(tmp_path):
    """300 synthetic images: validation 75 = 64 + 11, test 75, train 300: every evaluation ends
    on a short batch. Padding keeps one shape: the only recompile allowed is train -> eval."""
    out = tmp_path / "run"
    proc = run_train(smoke_args(out, ["--synthetic-size", "300", "--compile", "--epochs", "2"]), timeout=600,
                     TORCH_LOGS="recompiles")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recompiles = re.findall(r"Recompiling function", proc.stderr)
    assert len(recompiles) <= 1, proc.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["steady_epoch_time_s"] > 0


@pytest.fixture(scope="module")
def splits():
    return make_splits(make_synthetic(256), "full")


@pytest.mark.quick
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


@pytest.mark.quick
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


@pytest.mark.quick
def test_clipping_logs_the_pre_clip_norm_per_epoch(tmp_path):
    """--clip-grad-norm (#31): every step clips; the epoch records the pre-clip norm's mean and
    max (read once per epoch), null without clipping."""
    from conftest import read_jsonl, run_train, smoke_args
    clipped = run_train(smoke_args(tmp_path / "clip", ["--clip-grad-norm", "0.01", "--epochs", "2"]))
    assert clipped.returncode == 0, clipped.stderr[-2000:]
    rows = read_jsonl(tmp_path / "clip" / "metrics.jsonl")
    assert all(0.01 < r["grad_norm_mean"] <= r["grad_norm_max"] for r in rows), rows
    plain = run_train(smoke_args(tmp_path / "plain"))
    assert plain.returncode == 0 and "grad_norm_mean" not in read_jsonl(tmp_path / "plain" / "metrics.jsonl")[0]


@pytest.mark.quick
def test_ema_follows_timm_warm_up_swaps_and_round_trips():
    """dist_cifar/ema.py: shadow = d*shadow + (1-d)*w with d = min(DECAY, (1+n)/(10+n)); the
    average goes into the model only inside swapped_in(); its checkpoint view round-trips."""
    from dist_cifar import distributed as D
    from dist_cifar.ema import EMA
    from dist_cifar.parallel import ConsolidatedModel, Plan
    module = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(module.weight, 1.0)
    ema = EMA(module, 0.99, ConsolidatedModel(Plan(D.DistInfo()), module))
    expected = 1.0
    for n, w in enumerate((3.0, 5.0, 7.0)):
        with torch.no_grad():
            module.weight.fill_(w)
        d = min(0.99, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
        ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((1, 2), expected))
    with ema.swapped_in():
        assert torch.allclose(module.weight, torch.full((1, 2), expected))
    assert torch.equal(module.weight, torch.full((1, 2), 7.0))  # the trained weights are back
    state = ema.state_dict()
    other = EMA(module, 0.99, ConsolidatedModel(Plan(D.DistInfo()), module))
    other.load_state_dict(state)
    assert other.updates == 3 and torch.allclose(other.shadow[0], ema.shadow[0])
    assert torch.equal(module.weight, torch.full((1, 2), 7.0))
