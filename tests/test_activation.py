"""Fused batch norm + activation against torch's batch norm followed by the activation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fastbn
from conftest import DEVICES, assert_bn_state_within_budget, assert_within_budget, random_input, reference_batch_norm

ACTIVATIONS = [("relu", None), ("leaky_relu", None), ("leaky_relu", 0.2), ("elu", None), ("elu", 0.5),
               ("silu", None)]


def torch_activation(name, param):
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01 if param is None else param)
    if name == "elu":
        return nn.ELU(1.0 if param is None else param)
    return nn.SiLU()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((4, 6, 7, 5), False), ((4, 37, 5, 3), True), ((40, 9), False)],
                         ids=str)
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=str)
def test_fused_matches_bn_then_activation(activation, param, shape, channels_last, dtype, device):
    cls = fastbn.BatchNorm1d if len(shape) == 2 else fastbn.BatchNorm2d
    torch_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    channels = shape[1]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    torch_bn = torch_cls(channels).to(device, param_dtype)
    with torch.no_grad():
        torch_bn.weight.normal_(1.0, 0.5)
        torch_bn.bias.normal_(0.0, 0.5)
    fused = cls(channels, activation=activation, activation_param=param).to(device, param_dtype)
    fused.load_state_dict(torch_bn.state_dict())
    reference_bn = torch_cls(channels).to(device, torch.float64)
    reference_bn.load_state_dict(torch_bn.state_dict())
    act = torch_activation(activation, param)
    for step, training in enumerate((True, True, False)):
        for m in (torch_bn, fused, reference_bn):
            m.train(training)
        x = random_input(shape, dtype, device, channels_last, mean=0.5, std=2.0)
        grad = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
        x_torch, x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
        y_torch, y_fast, y_ref = act(torch_bn(x_torch)), fused(x_fast), act(reference_bn(x_ref))
        assert_within_budget(y_fast, y_torch, y_ref, f"step {step} output")
        y_torch.backward(grad)
        y_fast.backward(grad)
        y_ref.backward(grad.double())
        assert_within_budget(x_fast.grad, x_torch.grad, x_ref.grad, f"step {step} grad_input")
        assert_bn_state_within_budget(fused, torch_bn, reference_bn, step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=str)
def test_gradcheck_fused(activation, param, training, device):
    x = random_input((3, 4, 3, 5), torch.float64, device, mean=0.2, std=1.0).requires_grad_()
    weight = (1 + 0.3 * torch.randn(4, dtype=torch.float64, device=device)).requires_grad_()
    bias = (0.3 * torch.randn(4, dtype=torch.float64, device=device)).requires_grad_()
    running_mean = torch.randn(4, dtype=torch.float64, device=device)
    running_var = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fn(x, weight, bias):
        return fastbn.functional.batch_norm_act(x, running_mean.clone(), running_var.clone(), weight, bias, training,
                                                0.1, 1e-5, activation, param)

    assert gradcheck(fn, (x, weight, bias))
    assert gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused_ops(device):
    x = random_input((4, 5, 3, 3), torch.float32, device).requires_grad_()
    weight, bias = torch.randn(5, device=device), torch.randn(5, device=device)
    mean, var = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    for code, param in ((1, 0.0), (2, 0.1), (3, 1.0), (4, 0.0)):
        torch.library.opcheck(torch.ops.fastbn.batch_norm_train.default, (x, weight, bias, 1e-5, code, param))
        torch.library.opcheck(torch.ops.fastbn.batch_norm_eval.default, (x, weight, bias, mean, var, 1e-5, code, param))
        torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default,
                              (torch.randn_like(x), x.detach(), weight, bias, mean, var, 1e-5, True, code, param))


def test_reference_formula_of_the_fused_op():
    """The functional form against a float64 reference written out by hand."""
    x = random_input((5, 3, 4, 4), torch.float64, "cpu")
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = fastbn.functional.batch_norm_act(x, None, None, weight, bias, True, activation="elu", activation_param=0.7)
    z, _, _ = reference_batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    torch.testing.assert_close(y, F.elu(z, 0.7))


def test_drop_in_unchanged_without_activation():
    assert repr(fastbn.BatchNorm2d(8)) == repr(nn.BatchNorm2d(8))
    assert repr(fastbn.BatchNorm2d(8, activation="leaky_relu")) == (
        repr(nn.BatchNorm2d(8))[:-1] + ", activation='leaky_relu', activation_param=0.01)")
    # the fused module's state_dict is still torch's
    assert fastbn.BatchNorm2d(8, activation="relu").state_dict().keys() == nn.BatchNorm2d(8).state_dict().keys()


def test_bad_activation_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        fastbn.BatchNorm2d(4, activation="gelu")
    with pytest.raises(ValueError, match="activation_param applies to"):
        fastbn.BatchNorm2d(4, activation="relu", activation_param=0.1)
    with pytest.raises(RuntimeError, match="activation must be 0"):
        torch.ops.fastbn.batch_norm_train(torch.randn(4, 3), None, None, 1e-5, 9, 0.0)


def saved_bytes(fn, x):
    """Bytes of the tensors autograd keeps for backward while fn(x) runs (storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def test_fused_relu_saves_one_activation_less():
    x = random_input((16, 32, 20, 20), torch.float32, "cpu").requires_grad_()
    torch_pair = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU())
    fused = fastbn.BatchNorm2d(32, activation="relu")
    activation_bytes = x.numel() * x.element_size()
    torch_saved, fused_saved = saved_bytes(torch_pair, x), saved_bytes(fused, x)
    # torch keeps x (for BN) and the ReLU output; fastbn keeps x and recomputes the rest.
    assert torch_saved >= 2 * activation_bytes
    assert fused_saved < 1.1 * activation_bytes


def test_compile_fullgraph_fused_module():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), fastbn.BatchNorm2d(8, activation="silu"))
    compiled = torch.compile(model, fullgraph=True)
    x = random_input((4, 3, 9, 9), torch.float32, "cpu")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def cpp_activation_enum() -> dict:
    """name -> value of `enum class Activation` in csrc/bn_math.h, read from the source."""
    import pathlib
    import re

    source = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "bn_math.h").read_text()
    body = re.search(r"enum class Activation\s*:\s*int\s*\{([^}]*)\}", source).group(1)
    return {name: int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body)}


def test_python_activation_enum_is_the_cpp_one():
    """fastbn.ops.Activation has the C++ enum's members, with the same values (names compared
    without case or underscores: LeakyReLU is LEAKY_RELU)."""
    cpp = {name.lower(): value for name, value in cpp_activation_enum().items()}
    python = {member.name.lower().replace("_", ""): int(member) for member in fastbn.ops.Activation}
    assert cpp and python == cpp


@pytest.mark.parametrize("member", list(fastbn.ops.Activation), ids=lambda m: m.name)
def test_each_activation_code_runs_its_activation_in_the_kernels(member):
    """What each code does in the kernels is the activation its Python name says."""
    x = random_input((6, 5, 4, 3), torch.float64, "cpu")
    y = torch.ops.fastbn.batch_norm_eval(x, None, None, torch.zeros(5, dtype=torch.float64),
                                         torch.ones(5, dtype=torch.float64), 0.0, int(member), 0.3)
    param = 0.3 if member in fastbn.ops.PARAMETRIZED_ACTIVATIONS else None
    expected = x if member == fastbn.ops.Activation.IDENTITY else torch_activation(member.name.lower(), param)(x)
    torch.testing.assert_close(y, expected)
    with pytest.raises(RuntimeError, match="activation"):  # one past the last member: no such activation in C++
        torch.ops.fastbn.batch_norm_eval(x, None, None, torch.zeros(5, dtype=torch.float64),
                                         torch.ones(5, dtype=torch.float64), 0.0, len(fastbn.ops.Activation), 0.3)
