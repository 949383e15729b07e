"""gradcheck / gradgradcheck in float64, torch.library.opcheck on every op, torch.compile."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fastbn
from conftest import DEVICES, random_input

GRAD_SHAPES = [((3, 4, 5, 6), False), ((3, 4, 5, 6), True), ((7, 5), False), ((2, 3, 4), False),
               ((2, 3, 2, 3, 4), True)]


def double_inputs(shape, channels_last, device, requires_grad=True):
    x = random_input(shape, torch.float64, device, channels_last).requires_grad_(requires_grad)
    weight = (1 + 0.5 * torch.randn(shape[1], dtype=torch.float64, device=device)).requires_grad_(requires_grad)
    bias = torch.randn(shape[1], dtype=torch.float64, device=device).requires_grad_(requires_grad)
    return x, weight, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,channels_last", GRAD_SHAPES, ids=str)
def test_gradcheck_and_gradgradcheck(shape, channels_last, training, affine, device):
    x, weight, bias = double_inputs(shape, channels_last, device)
    running_mean = torch.randn(shape[1], dtype=torch.float64, device=device)
    running_var = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5

    def fn(x, weight, bias):
        # clones: training mode updates the running statistics in place
        return fastbn.functional.batch_norm(x, running_mean.clone(), running_var.clone(),
                                            weight if affine else None, bias if affine else None, training, 0.1, 1e-5)

    inputs = (x, weight, bias) if affine else (x, weight.detach(), bias.detach())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_of_batch_statistics_outputs(device):
    """The train op also returns the batch mean and variance; their grads are right too."""
    x, weight, bias = double_inputs((4, 3, 5, 5), False, device)
    assert gradcheck(lambda *a: torch.ops.fastbn.batch_norm_train(*a, 1e-5), (x, weight, bias))


def opcheck_samples(device):
    """Several argument sets per op: layouts, dtypes, optional tensors absent."""
    samples = []
    for shape, channels_last, dtype in [((4, 3, 5, 5), False, torch.float32), ((4, 8, 3, 3), True, torch.float32),
                                        ((6, 5), False, torch.float64), ((3, 4, 7), False, torch.bfloat16),
                                        ((2, 3, 2, 3, 4), True, torch.float16)]:
        channels = shape[1]
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        x = random_input(shape, dtype, device, channels_last)
        weight = torch.randn(channels, dtype=param_dtype, device=device)
        bias = torch.randn(channels, dtype=param_dtype, device=device)
        running_mean = torch.randn(channels, dtype=param_dtype, device=device)
        running_var = torch.rand(channels, dtype=param_dtype, device=device) + 0.5
        grad = torch.randn_like(x)
        samples.append(dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                            grad=grad, trainable=dtype in (torch.float32, torch.float64)))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    for s in opcheck_samples(device):
        grad_x = s["x"].detach().requires_grad_(s["trainable"])
        grad_w = s["weight"].detach().requires_grad_(s["trainable"])
        for weight, bias in ((s["weight"], s["bias"]), (None, None), (grad_w, s["bias"])):
            torch.library.opcheck(torch.ops.fastbn.batch_norm_train.default, (grad_x, weight, bias, 1e-5))
            torch.library.opcheck(torch.ops.fastbn.batch_norm_eval.default,
                                  (grad_x, weight, bias, s["running_mean"], s["running_var"], 1e-5))
        mean, var = s["running_mean"], s["running_var"]
        if s["x"].dtype in (torch.float16, torch.bfloat16):
            mean, var = mean.float(), var.float()
        for train in (True, False):
            # The backward op has no autograd formula of its own (double backward is
            # composed from torch ops), so its samples require no grad.
            torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default,
                                  (s["grad"], s["x"], s["weight"], s["bias"], mean, var, 1e-5, train))
        torch.library.opcheck(torch.ops.fastbn.update_running_stats.default,
                              (s["running_mean"].clone(), s["running_var"].clone(), mean.to(torch.float64 if
                               s["x"].dtype == torch.float64 else torch.float32), var.to(mean.dtype if
                               s["x"].dtype != torch.float64 else torch.float64), 0.1, s["x"].numel() // s["x"].shape[1]))


class SmallConvNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = norm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    eager = SmallConvNet(fastbn.BatchNorm2d).to(device)
    compiled_model = SmallConvNet(fastbn.BatchNorm2d).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step, training in enumerate((True, True, False)):
        eager.train(training)
        compiled_model.train(training)
        x = random_input((6, 3, 10, 10), torch.float32, device)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        if training:
            y_eager.square().sum().backward()
            y_compiled.square().sum().backward()
            for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
                torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(compiled_model.bn.running_mean, eager.bn.running_mean)
        torch.testing.assert_close(compiled_model.bn.running_var, eager.bn.running_var)
        assert compiled_model.bn.num_batches_tracked.item() == eager.bn.num_batches_tracked.item()


def test_compiled_autograd_matches_eager():
    """torch's compiled autograd (the backward graph captured and compiled) runs fastbn's backward:
    with compiled autograd on, the eager forward builds the torch::autograd::Function's node, which
    compiled autograd can lift (the plain Node of other eager calls has no compiled_args /
    apply_with_saved, csrc/autograd.h)."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    compiled_backwards = []

    def compiler_fn(graph_module):
        compiled_backwards.append(graph_module)
        return torch.compile(graph_module, backend="eager")

    for module_class in (fastbn.BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        bn = module_class(4)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
        x = random_input((3, 4, 5, 6)).requires_grad_()
        dy = torch.randn(3, 4, 5, 6)
        if module_class is fastbn.BatchNorm2d:
            with compiled_autograd._enable(compiler_fn):
                bn(x).backward(dy)
            compiled = (x.grad, bn.weight.grad, bn.bias.grad)
        else:
            bn(x).backward(dy)
            reference = (x.grad, bn.weight.grad, bn.bias.grad)
    assert len(compiled_backwards) == 1
    for got, want, name in zip(compiled, reference, ("input", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_direct_op_calls_refuse_dual_tensors(grad_mode):
    """The ops' C++ autograd has no jvp: a dual tensor passed to the op itself (not through
    fastbn.functional, which routes forward AD to Functions with a jvp) gets an error, with grad
    mode on or off, never an output silently without its tangent."""
    import torch.autograd.forward_ad as fwAD

    x = random_input((3, 4, 5, 6))
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.fastbn.batch_norm_train(dual, None, None, 1e-5)
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.fastbn.batch_norm_eval(dual, None, None, running_mean, running_var, 1e-5)
        dual_stats = fwAD.make_dual(running_mean, torch.ones(4))
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.fastbn.batch_norm_eval(x, None, None, dual_stats, running_var, 1e-5)


def test_ops_without_grad_build_no_graph():
    """Under no_grad, or with no input that requires grad, the ops return plain tensors (the
    kernel runs without an autograd node), equal to the recorded call's."""
    x = random_input((3, 4, 5, 6))
    weight = (1 + 0.5 * torch.randn(4)).requires_grad_()
    bias = torch.randn(4).requires_grad_()
    recorded = torch.ops.fastbn.batch_norm_train(x, weight, bias, 1e-5)
    assert recorded[0].grad_fn is not None
    with torch.no_grad():
        plain = torch.ops.fastbn.batch_norm_train(x, weight, bias, 1e-5)
    constants = torch.ops.fastbn.batch_norm_train(x, weight.detach(), bias.detach(), 1e-5)
    for outputs in (plain, constants):
        assert all(t.grad_fn is None and not t.requires_grad for t in outputs)
        for got, want in zip(outputs, recorded):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def eager_training_output(bn, x):
    y = bn(x)
    assert y.grad_fn.name() == "fastbn::BatchNormTrainBackward", y.grad_fn.name()  # the plain Node
    return y


def test_plain_node_matches_the_function_node():
    """Eager calls build the plain Node, direct op calls the Function's node: the same gradients,
    the weight's and bias's in their own dtype (float32 parameters, bfloat16 input)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        bn = fastbn.BatchNorm2d(5)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
        x = random_input((3, 5, 4, 6), dtype).requires_grad_()
        dy = torch.randn(3, 5, 4, 6).to(dtype)
        eager_training_output(bn, x).backward(dy)
        plain = (x.grad, bn.weight.grad, bn.bias.grad)
        x.grad = bn.weight.grad = bn.bias.grad = None
        y, _, _ = torch.ops.fastbn.batch_norm_train(x, bn.weight, bn.bias, bn.eps)
        assert "BatchNormTrainBackward" not in y.grad_fn.name()
        y.backward(dy)
        for got, want in zip(plain, (x.grad, bn.weight.grad, bn.bias.grad)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert bn.weight.grad.dtype == torch.float32
        eval_output = bn.eval()(x)
        assert eval_output.grad_fn.name() == "fastbn::BatchNormEvalBackward"
        bn.train()


def test_plain_node_second_backward_and_modified_input_raise():
    """torch's errors for a freed graph and for a saved input changed in place."""
    bn = fastbn.BatchNorm2d(4)
    x = random_input((2, 4, 3, 5)).requires_grad_()
    y = eager_training_output(bn, x)
    y.backward(torch.ones_like(y), retain_graph=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(torch.ones_like(y))
    leaf = random_input((2, 4, 3, 5)).requires_grad_()
    x = leaf * 1.0
    y = eager_training_output(bn, x)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


def test_plain_node_runs_saved_tensor_hooks():
    """torch.autograd.graph.saved_tensors_hooks see what the node saves and give it back."""
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor.clone()

    bn = fastbn.BatchNorm2d(4)
    x = random_input((2, 4, 3, 5)).requires_grad_()
    dy = torch.randn(2, 4, 3, 5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = eager_training_output(bn, x)
    assert torch.Size((2, 4, 3, 5)) in packed and torch.Size((4,)) in packed
    y.backward(dy)
    got = x.grad.clone()
    x.grad = None
    torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True).backward(dy)
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)


def test_compiled_autograd_takes_the_function_node_in_its_region():
    """Inside compiled autograd's region the eager forward builds the Function's node; outside, the plain one."""
    from torch._dynamo import compiled_autograd

    bn = fastbn.BatchNorm2d(4)
    x = random_input((2, 4, 3, 5)).requires_grad_()
    eager_training_output(bn, x)
    with compiled_autograd._enable(lambda graph_module: graph_module):
        assert "BatchNormTrainBackward" not in bn(x).grad_fn.name()
    eager_training_output(bn, x)


@pytest.mark.skipif(not hasattr(torch.autograd.graph, "node_creation_hook"),
                    reason="torch.autograd.graph.node_creation_hook is new in torch 2.14 (this torch lacks it)")
def test_plain_node_fires_node_creation_hooks():
    """torch.autograd.graph.node_creation_hook sees fastbn's nodes, complete (their next functions wired)."""
    seen = []
    bn = fastbn.BatchNorm2d(4)
    x = random_input((2, 4, 3, 5)).requires_grad_()
    with torch.autograd.graph.node_creation_hook(lambda node: seen.append((node.name(), len(node.next_functions)))):
        eager_training_output(bn, x)
        bn.eval()(x)
    assert ("fastbn::BatchNormTrainBackward", 4) in seen and ("fastbn::BatchNormEvalBackward", 4) in seen, seen
