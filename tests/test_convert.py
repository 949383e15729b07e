"""convert_model and fold_bn on torchvision's resnet18 and on Sequential models."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fastbn
from conftest import random_input


def randomized_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("fuse", [False, True])
def test_convert_resnet18_same_outputs_train_and_eval(fuse):
    original = randomized_resnet18()
    converted = fastbn.convert_model(copy.deepcopy(original), fuse_activations=fuse)
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(isinstance(m, fastbn.BatchNorm2d) for m in bns)
    fused = [m for m in bns if m.activation == "relu"]
    # stem and the first BN of each of the 8 blocks are followed by ReLU; after bn2 comes the residual add
    assert len(fused) == (9 if fuse else 0)
    assert list(converted.state_dict()) == list(original.state_dict())
    x = random_input((4, 3, 48, 48), torch.float32, "cpu")
    for training in (False, True, False):
        original.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4)
    for a, b in zip(converted.state_dict().values(), original.state_dict().values()):
        torch.testing.assert_close(a, b)  # running stats updated alike in the training step


def test_convert_keeps_mode_device_dtype_and_shares_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2)).double().eval()
    bn = model[1]
    converted = fastbn.convert_model(model, fuse_activations=True)
    new_bn = converted[1]
    assert isinstance(new_bn, fastbn.BatchNorm2d) and not new_bn.training
    assert new_bn.weight is bn.weight and new_bn.running_mean is bn.running_mean
    assert new_bn.weight.dtype == torch.float64
    assert new_bn.activation == "leaky_relu" and new_bn.activation_param == 0.2
    assert isinstance(converted[2], nn.Identity)


def test_convert_does_not_fuse_negative_slope_or_unknown_activation():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.LeakyReLU(-0.5), nn.BatchNorm1d(4), nn.GELU())
    converted = fastbn.convert_model(model, fuse_activations=True)
    assert converted[0].activation is None and converted[2].activation is None


def test_fold_bn_resnet18_and_fused_model():
    original = randomized_resnet18().eval()
    folded = fastbn.fold_bn(original)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in original.modules()), "the original stays as it was"
    x = random_input((2, 3, 48, 48), torch.float32, "cpu")
    torch.testing.assert_close(folded(x), original(x), rtol=1e-4, atol=1e-4)
    converted = fastbn.convert_model(copy.deepcopy(original), fuse_activations=True).eval()
    folded_converted = fastbn.fold_bn(converted)
    torch.testing.assert_close(folded_converted(x), original(x), rtol=1e-4, atol=1e-4)


def test_fold_bn_linear_creates_bias_and_skips_training_bn():
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    model[3].train()  # a training-mode BN is not folded
    folded = fastbn.fold_bn(model)
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert isinstance(folded[3], nn.BatchNorm2d)
    x = torch.randn(3, 5)
    torch.testing.assert_close(folded[:2](x), model[:2](x), rtol=1e-5, atol=1e-5)
