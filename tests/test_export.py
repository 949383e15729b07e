"""ONNX export (both exporters) of models with fastbn's modules and functional API: standard
ONNX ops only, the same graph as torch's modules give, run by onnxruntime with the same outputs.
About 15 s on a 2-core CPU (the torch.export-based exporter takes 1-4 s per export)."""
import functools
import io
import warnings

import pytest
import torch
from torch import nn

import fastbn
from conftest import random_input, randomize_batch_norms

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

STANDARD_DOMAINS = ("", "ai.onnx")


class Activated(nn.Module):
    """torch's twin of one fastbn module: BN, [+ residual], activation module."""

    def __init__(self, bn_class, channels, activation=None):
        super().__init__()
        self.bn, self.activation = bn_class(channels), activation or nn.Identity()

    def forward(self, input, residual=None):
        output = self.bn(input)
        return self.activation(output if residual is None else output + residual)


def fastbn_layers():
    return nn.ModuleDict({
        "flat": fastbn.BatchNorm1d(6, activation="relu"),
        "seq": fastbn.BatchNorm1d(6, activation="leaky_relu", activation_param=0.2),
        "relu": fastbn.BatchNorm2d(6, activation="relu"),
        "leaky": fastbn.BatchNorm2d(6, activation="leaky_relu", activation_param=0.2),
        "elu": fastbn.BatchNorm2d(6, activation="elu", activation_param=0.7),
        "silu": fastbn.BatchNorm2d(6, activation="silu"),
        "residual": fastbn.BatchNorm2d(6, activation="relu"),
        "inplace": fastbn.BatchNorm2d(6, activation="leaky_relu", inplace=True),
        "plain": fastbn.BatchNorm2d(6),
        "volume": fastbn.BatchNorm3d(6, activation="elu"),
    })


def torch_layers():
    return nn.ModuleDict({
        "flat": Activated(nn.BatchNorm1d, 6, nn.ReLU()),
        "seq": Activated(nn.BatchNorm1d, 6, nn.LeakyReLU(0.2)),
        "relu": Activated(nn.BatchNorm2d, 6, nn.ReLU()),
        "leaky": Activated(nn.BatchNorm2d, 6, nn.LeakyReLU(0.2)),
        "elu": Activated(nn.BatchNorm2d, 6, nn.ELU(0.7)),
        "silu": Activated(nn.BatchNorm2d, 6, nn.SiLU()),
        "residual": Activated(nn.BatchNorm2d, 6, nn.ReLU()),
        "inplace": Activated(nn.BatchNorm2d, 6, nn.LeakyReLU(0.01)),
        "plain": Activated(nn.BatchNorm2d, 6),
        "volume": Activated(nn.BatchNorm3d, 6, nn.ELU()),
    })


class Net(nn.Module):
    """Every fastbn module kind (1d, 2d, 3d, each activation, residual, inplace) and the
    functional API, after a conv (which the exporters may fold a following BN into)."""

    def __init__(self, layers, functional):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.layers, self.functional = layers, functional
        for name in ("mean", "var", "weight", "bias"):
            self.register_buffer(f"f_{name}", torch.rand(6) + 0.5)

    def forward(self, flat, seq, image, volume):
        layers = self.layers
        x = layers["relu"](torch.relu(self.conv(image)))
        x = layers["leaky"](x)
        x = layers["elu"](x)
        x = layers["silu"](x)
        x = layers["residual"](x, image.mean(1, keepdim=True).expand_as(x))
        x = layers["inplace"](x * 2)
        x = layers["plain"](x)
        x = self.functional(x, self.f_mean, self.f_var, self.f_weight, self.f_bias)
        return layers["flat"](flat), layers["seq"](seq), x, layers["volume"](volume)


def fastbn_functional(x, mean, var, weight, bias):
    x = fastbn.batch_norm(x, mean, var, weight, bias)
    x = fastbn.batch_norm_act(x, mean, var, weight, bias, activation="elu")
    return fastbn.batch_norm_add_act(x, x * 0.5, mean, var, weight, bias, activation="leaky_relu")


def torch_functional(x, mean, var, weight, bias):
    x = torch.nn.functional.batch_norm(x, mean, var, weight, bias)
    x = torch.nn.functional.elu(torch.nn.functional.batch_norm(x, mean, var, weight, bias))
    return torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(x, mean, var, weight, bias) + x * 0.5)


def twin_models():
    """(fastbn model, torch model) with the same weights and running statistics."""
    torch.manual_seed(0)
    fast = randomize_batch_norms(Net(fastbn_layers(), fastbn_functional))
    reference = Net(torch_layers(), torch_functional)
    reference.load_state_dict(_torch_keys(fast.state_dict()))
    return fast.eval(), reference.eval()


def _torch_keys(state):
    """fastbn's layers.<name>.<tensor> is torch's layers.<name>.bn.<tensor>."""
    return {(key.replace(".", ".bn.", 2).replace(".bn.", ".", 1) if key.startswith("layers.") else key): value
            for key, value in state.items()}


def inputs(channels_last=False):
    return (random_input((5, 6)), random_input((5, 6, 7)), random_input((2, 3, 5, 4), channels_last=channels_last),
            random_input((2, 6, 3, 4, 2), channels_last=channels_last))


def export(model, args, dynamo):
    """The ONNX ModelProto of `model` from the legacy (TorchScript) or the torch.export-based exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation warning
        if dynamo:
            return torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def run(proto, args):
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {node.name: arg.numpy() for node, arg in zip(session.get_inputs(), args)}
    return [torch.from_numpy(output) for output in session.run(None, feeds)]


def op_types(proto):
    assert not proto.functions, "the exported model calls local functions"
    domains = {node.domain for node in proto.graph.node}
    assert domains <= set(STANDARD_DOMAINS), f"non-standard ONNX domains {domains}"
    return sorted(node.op_type for node in proto.graph.node if node.op_type != "Constant")


@functools.lru_cache(maxsize=None)
def dynamo_sets_export_flag() -> bool:
    """Whether this torch's torch.export-based exporter runs the model under is_in_onnx_export()."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.onnx.is_in_onnx_export())
            return x + 1

    export(Probe(), (torch.ones(2),), dynamo=True)
    return any(seen)


EXPORTERS = [pytest.param(False, id="torchscript_exporter"), pytest.param(True, id="dynamo_exporter")]


def skip_unless_supported(dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
        if not dynamo_sets_export_flag():
            pytest.skip("this torch's torch.export-based ONNX exporter does not set torch.onnx.is_in_onnx_export()")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnx_export_is_torchs_graph_and_runs_in_onnxruntime(dynamo, channels_last):
    skip_unless_supported(dynamo)
    fast, reference = twin_models()
    args = inputs(channels_last)
    expected = fast(*[a.clone() for a in args])
    torch.testing.assert_close(expected, reference(*args), rtol=1e-5, atol=1e-5)  # the twins agree

    proto = export(fast, args, dynamo)
    ops = op_types(proto)
    assert ops == op_types(export(reference, args, dynamo))
    # one per batch norm: 10 modules and 3 functional calls (the relu after the conv keeps it from being folded)
    assert ops.count("BatchNormalization") == 13
    assert {"Relu", "LeakyRelu", "Elu", "Sigmoid", "Add"} <= set(ops)
    outputs = run(proto, args)
    for output, value in zip(outputs, expected):
        torch.testing.assert_close(output, value, rtol=1e-5, atol=1e-5)
    assert not fastbn.interop.onnx_exporting()


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnx_export_in_training_mode_as_torch(dynamo):
    """A model left in training mode exports as the same model with torch's BN does
    (the legacy exporter's training=TrainingMode.TRAINING: BatchNormalization with
    training_mode=1; the torch.export-based one: running statistics)."""
    skip_unless_supported(dynamo)
    exported = []
    x = random_input((4, 3, 5, 5))
    for bn in (fastbn.BatchNorm2d(3, activation="relu"), nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())):
        torch.manual_seed(0)
        model = nn.Sequential(nn.ReLU(), bn).train()
        if dynamo:
            proto = export(model, (x,), dynamo=True)
        else:
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), buffer, dynamo=False, training=torch.onnx.TrainingMode.TRAINING)
            proto = onnx.load_from_string(buffer.getvalue())
        exported.append((op_types(proto), run(proto, (x,))))
    (fast_ops, fast_outputs), (torch_ops, torch_outputs) = exported
    assert fast_ops == torch_ops and "BatchNormalization" in fast_ops
    torch.testing.assert_close(fast_outputs, torch_outputs, rtol=1e-5, atol=1e-5)


def test_torch_export_outside_onnx_keeps_fastbn_ops():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fastbn.BatchNorm2d(4, activation="silu")).eval()
    x = random_input((2, 3, 6, 6))
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "fastbn.batch_norm_eval.default" in targets
    assert not any("batch_norm" in target and "fastbn" not in target for target in targets)
    torch.testing.assert_close(program.module()(x), model(x))
