""""""
from __future__ import annotations

import itertools

import pytest
import torch

from dist_cifar.config import ConfigError, make_config
from dist_cifar.models import build_model, count_parameters, MODELS, SmallCNN, VGG16CIFAR
from dist_cifar.cost import measure


@pytest.mark.quick
@pytest.mark.parametrize("name", ["linear", "simple_cnn", "small_cnn", "vgg_truncated"])
def test_output_shape(name):
    model = build_model(name).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.quick
def test_vgg16_cifar_exact_size_and_shape():
    with torch.device("meta"):
        model = VGG16CIFAR()
    assert count_parameters(model) == 332_943_818
    assert model.flattened_size == 73_728
    assert model.fc_layer[1].in_features == 73_728 and model.fc_layer[1].out_features == 4096
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)
    feats = model.conv_layer(torch.empty(2, 3, 32, 32, device="meta"))
    assert feats.shape == (2, 512, 12, 12)


@pytest.mark.quick
@pytest.mark.parametrize("bn,drop,pool", list(itertools.product([True, False], repeat=3)))
def test_small_cnn_switches(bn, drop, pool):
    model = SmallCNN(batchnorm=bn, dropout=drop, pooling=pool).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.flattened_size == (16 * 8 * 8 if pool else 16 * 32 * 32)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == bn
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules()) == drop


@pytest.mark.quick
def test_protocol_layer_sizes():
    assert build_model("simple_cnn").fc1.in_features == 4608
    assert build_model("vgg_truncated").fc_layer[1].in_features == 4096
    assert count_parameters(build_model("linear")) == 3072 * 10 + 10


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        make_config(model="resnet50")
    for name in MODELS:
        assert name in str(err.value)


@pytest.mark.quick
def test_flip_tta_averages_the_two_views_and_is_what_evaluation_sees():
    import torch

    from dist_cifar import distributed as D
    from dist_cifar.assembly import assemble
    from dist_cifar.parallel import FlipAveraged
    from dist_cifar.config import make_config
    from dist_cifar.data import make_splits, make_synthetic
    from dist_cifar.engine import evaluate
    info = D.DistInfo()
    splits = make_splits(make_synthetic(256), "full")
    plain = assemble(make_config(model="small_cnn", device="cpu", wandb="off"), info, splits)
    tta = assemble(make_config(model="small_cnn", device="cpu", wandb="off", tta_flip=True), info, splits)
    tta.model.module.load_state_dict(plain.model.module.state_dict())
    assert isinstance(tta.model.eval_model, FlipAveraged) and not isinstance(plain.model.eval_model, FlipAveraged)
    x = torch.randn(4, 3, 32, 32)
    plain.model.module.eval()
    with torch.no_grad():
        expected = (plain.model.module(x) + plain.model.module(x.flip(3))) / 2
        assert torch.allclose(tta.model.eval_model.eval()(x), expected, atol=1e-6)
    a = evaluate(plain.model.eval_model, plain.shards(splits.test), plain.precision, info)
    b = evaluate(tta.model.eval_model, tta.shards(splits.test), tta.precision, info)
    assert a.count == b.count == len(splits.test) and a.loss != b.loss  # a different function was evaluated


@pytest.mark.quick
def test_cost_of_vgg16_cifar():
    cost = measure("vgg16_cifar")
    assert cost.params == 332_943_818
    assert abs(cost.train_flops_per_image / 1e9 - 17.8) <= 0.1
    assert cost.param_groups["linear fc_layer.1 (73728->4096)"] == 73728 * 4096 + 4096
    assert cost.grad_bytes_fp32 == 4 * 332_943_818
