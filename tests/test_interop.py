"""fastbn's modules in torch's model tools: torch.fx (a leaf, as torch's BN), torch.ao.quantization
fusion (fastbn.FUSER_METHOD_MAPPING) and torch.jit.script (a torch module sharing the state)."""
import copy
import io

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.fx.experimental.optimization
from torch import nn

import fastbn
from conftest import random_input, randomize_batch_norms as randomize

# torch.jit.script/save/load are deprecated (FutureWarning) but still work
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")

ACTIVATIONS = [(None, None), ("relu", None), ("leaky_relu", 0.2), ("elu", 0.7), ("silu", None)]


def assert_same_state(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------- torch.fx


def conv_bn_relu(activation="relu", momentum=0.1):
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 3), fastbn.BatchNorm2d(4, activation=activation,
                                                                          momentum=momentum), nn.ReLU()))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fx_symbolic_trace_keeps_bn_a_leaf_with_its_train_eval_semantics(momentum):
    model = conv_bn_relu(momentum=momentum)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    calls = [(node.op, node.target) for node in traced.graph.nodes if node.op.startswith("call")]
    assert calls == [("call_module", "0"), ("call_module", "1"), ("call_module", "2")]
    assert type(traced.get_submodule("1")) is fastbn.BatchNorm2d
    # train()/eval() reach the module: batch statistics and updates in training, running ones in eval
    for training in (True, True, False, True, False):
        model.train(training)
        traced.train(training)
        x = random_input((4, 3, 6, 6))
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)
        assert_same_state(traced, model)
    assert int(model[1].num_batches_tracked) == 3


def test_fx_optimization_fuse_runs_and_keeps_fastbn_bn():
    """torch.fx.experimental.optimization.fuse folds only modules of torch's exact types:
    fastbn's BN stays (fastbn.fold_bn folds it); the result computes what the model does."""
    model = conv_bn_relu().eval()
    fused = torch.fx.experimental.optimization.fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert any(type(m) is fastbn.BatchNorm2d for m in fused.modules())
    x = random_input((2, 3, 6, 6))
    torch.testing.assert_close(fused(x), model(x))


def test_fx_leaf_marker_changes_nothing_else(tmp_path):
    bn = fastbn.BatchNorm2d(5, activation="leaky_relu", activation_param=0.3)
    reference = nn.BatchNorm2d(5)
    assert type(bn).__module__ == "fastbn.modules"
    assert repr(bn) == repr(reference)[:-1] + ", activation='leaky_relu', activation_param=0.3)"
    assert list(bn.state_dict()) == list(reference.state_dict())
    randomize(bn).eval()
    x = random_input((2, 5, 3, 3))
    path = tmp_path / "bn.pt"
    torch.save(nn.Sequential(bn), path)
    for restored in (torch.load(path, weights_only=False)[0], copy.deepcopy(bn)):
        assert type(restored) is fastbn.BatchNorm2d and type(restored).__module__ == "fastbn.modules"
        assert repr(restored) == repr(bn)
        assert_same_state(restored, bn)
        torch.testing.assert_close(restored(x), bn(x))
        traced = torch.fx.symbolic_trace(nn.Sequential(restored))
        assert [node.op for node in traced.graph.nodes] == ["placeholder", "call_module", "output"]


def test_fx_traces_residual_call_and_sync_batchnorm():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = fastbn.BatchNorm2d(4, activation="relu")
            self.sync = fastbn.SyncBatchNorm(4)

        def forward(self, x):
            return self.sync(self.bn(self.conv(x), x))

    model = randomize(Block()).eval()
    traced = torch.fx.symbolic_trace(model)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert calls == ["conv", "bn", "sync"]
    x = random_input((2, 4, 5, 5))
    torch.testing.assert_close(traced(x), model(x))


# ---------------------------------------------------------------- torch.ao.quantization.fuse_modules

CUSTOM = {"additional_fuser_method_mapping": fastbn.FUSER_METHOD_MAPPING}

# (layers, input shape): every pattern of torch's fuser table that has a batch norm
FUSION_CASES = [
    ((nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 9)),
    ((nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), (2, 3, 9)),
    ((nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 6, 6)),
    ((nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), (2, 3, 6, 6)),
    ((nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), (2, 3, 4, 5, 5)),
    ((nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU()), (2, 3, 4, 5, 5)),
    ((nn.Linear(3, 4), nn.BatchNorm1d(4)), (5, 3)),
    ((nn.BatchNorm2d(3), nn.ReLU()), (2, 3, 4, 4)),
    ((nn.BatchNorm3d(3), nn.ReLU()), (2, 3, 2, 4, 4)),
    ((nn.ConvTranspose1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 5)),
    ((nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 4, 4)),
    ((nn.ConvTranspose3d(3, 4, 3), nn.BatchNorm3d(4)), (2, 3, 2, 3, 3)),
]
FASTBN_FOR = {nn.BatchNorm1d: fastbn.BatchNorm1d, nn.BatchNorm2d: fastbn.BatchNorm2d,
              nn.BatchNorm3d: fastbn.BatchNorm3d}


def with_fastbn(torch_model, **bn_kwargs):
    """A copy of `torch_model` with each torch BN replaced by fastbn's, same state."""
    model = copy.deepcopy(torch_model)
    for name, module in list(model.named_children()):
        if type(module) in FASTBN_FOR:
            fast = FASTBN_FOR[type(module)](module.num_features, **bn_kwargs)
            fast.load_state_dict(module.state_dict())
            setattr(model, name, fast)
    return model.train(torch_model.training)


def fusion_case(layers):
    torch_model = randomize(nn.Sequential(*copy.deepcopy(layers)))
    return torch_model, with_fastbn(torch_model), [str(i) for i in range(len(layers))]


@pytest.mark.parametrize("layers,shape", FUSION_CASES, ids=lambda case: "-".join(
    type(m).__name__ for m in case) if isinstance(case, tuple) and isinstance(case[0], nn.Module) else None)
def test_fuse_modules_eval_as_torch(layers, shape):
    torch_model, model, names = fusion_case(layers)
    torch_model.eval(), model.eval()
    fused = torch.ao.quantization.fuse_modules(model, names, fuse_custom_config_dict=CUSTOM)
    expected = torch.ao.quantization.fuse_modules(torch_model, names)
    assert [type(m) for m in fused] == [type(m) for m in expected]
    x = random_input(shape)
    torch.testing.assert_close(fused(x), expected(x))
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers,shape", [case for case in FUSION_CASES if not isinstance(case[0][0], (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))])  # torch does not fuse those for QAT
def test_fuse_modules_qat_as_torch(layers, shape):
    """QAT fusion gives torch's intrinsic modules around a torch BN sharing fastbn's parameters
    and buffers: training steps give torch's outputs and running statistics."""
    torch_model, model, names = fusion_case(layers)
    fast_bn = next(m for m in model if type(m) in FASTBN_FOR.values())
    fused = torch.ao.quantization.fuse_modules_qat(model, names, inplace=True, fuse_custom_config_dict=CUSTOM)
    expected = torch.ao.quantization.fuse_modules_qat(torch_model, names)
    assert [type(m) for m in fused] == [type(m) for m in expected]
    bn = next(m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert type(bn) in FASTBN_FOR and bn.weight is fast_bn.weight and bn.running_var is fast_bn.running_var
    for _ in range(2):
        x = random_input(shape)
        torch.testing.assert_close(fused(x), expected(x), rtol=1e-5, atol=1e-5)
    assert_same_state(fused, expected)


@pytest.mark.parametrize("activation,param", ACTIVATIONS[1:])
def test_fuse_modules_takes_the_fused_activation_along(activation, param):
    torch_model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model = with_fastbn(torch_model, activation=activation, activation_param=param)
    fused = torch.ao.quantization.fuse_modules(model, ["0", "1"], fuse_custom_config_dict=CUSTOM)
    if activation == "relu":  # torch's conv + bn + relu fusion
        assert type(fused[0]) is nni.ConvReLU2d
    x = random_input((2, 3, 6, 6))
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    qat = torch.ao.quantization.fuse_modules_qat(model.train(), ["0", "1"], fuse_custom_config_dict=CUSTOM)
    torch.testing.assert_close(qat(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_modules_refuses_a_second_activation_and_a_residual_call():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), fastbn.BatchNorm2d(4, activation="elu"), nn.ReLU())).eval()
    with pytest.raises(ValueError, match="activation \\('elu'\\) is already fused"):
        torch.ao.quantization.fuse_modules(model, ["0", "1", "2"], fuse_custom_config_dict=CUSTOM)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), fastbn.BatchNorm2d(4, activation="relu")

        def forward(self, x):
            return self.bn(self.conv(x), x)

    fused = torch.ao.quantization.fuse_modules(randomize(Residual()).eval(), ["conv", "bn"],
                                               fuse_custom_config_dict=CUSTOM)
    with pytest.raises(TypeError):  # the BN's place holds nn.Identity, which takes no residual
        fused(random_input((2, 4, 5, 5)))


def test_fuse_modules_qat_runs_the_bn_hooks_once_as_torch():
    calls = []
    x = random_input((2, 3, 6, 6))
    for bn_class in (nn.BatchNorm2d, fastbn.BatchNorm2d):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), bn_class(4))
        model[1].register_forward_hook(lambda module, args, output, name=bn_class.__module__: calls.append(name))
        torch.ao.quantization.fuse_modules_qat(model, ["0", "1"], fuse_custom_config_dict=CUSTOM)(x)
    assert calls == ["torch.nn.modules.batchnorm", "fastbn.modules"]


# ---------------------------------------------------------------- torch.jit.script


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("cls,shape", [(fastbn.BatchNorm1d, (6, 3)), (fastbn.BatchNorm1d, (4, 3, 5)),
                                       (fastbn.BatchNorm2d, (4, 3, 5, 5)), (fastbn.BatchNorm3d, (2, 3, 3, 4, 4))])
def test_jit_script_computes_as_the_module_sharing_its_state(cls, shape, activation, param):
    module = randomize(cls(3, activation=activation, activation_param=param))
    reference = copy.deepcopy(module)
    scripted = torch.jit.script(module)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert list(scripted.state_dict()) == list(reference.state_dict())
    for name, tensor in module.state_dict().items():  # the same tensors: updates reach the module
        assert scripted.state_dict()[name].data_ptr() == tensor.data_ptr()
    for training in (True, True, False):
        scripted.train(training)
        reference.train(training)
        x, residual = random_input(shape), random_input(shape, mean=0.0)
        torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted(x, residual), reference(x, residual), rtol=1e-5, atol=1e-5)
        assert_same_state(module, reference)


def test_jit_script_model_with_momentum_none_saves_and_loads():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fastbn.BatchNorm2d(4, momentum=None, activation="leaky_relu"),
                          fastbn.BatchNorm2d(4, inplace=True, activation="elu"))
    model = randomize(model)
    reference = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    # torch.jit.script assigns what __prepare_scriptable__ returns back into the model
    assert isinstance(model[1], fastbn.interop.ScriptableBatchNorm2d)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for training in (True, True, False):
        for m in (loaded, reference):
            m.train(training)
        x = random_input((3, 3, 6, 6))
        torch.testing.assert_close(loaded(x), reference(x.clone()), rtol=1e-5, atol=1e-5)
    assert_same_state(loaded, reference)


def test_jit_script_refuses_sync_batchnorm():
    with pytest.raises(NotImplementedError, match="SyncBatchNorm has no torch equivalent"):
        torch.jit.script(fastbn.SyncBatchNorm(3))

