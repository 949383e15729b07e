"""Whole-model tools: swap torch's batch norms for fastbn's, fuse the activation
that follows each, and fold eval-mode batch norms into the preceding layer.

``convert_model`` keeps every parameter and buffer (the same tensor objects),
the train/eval mode, device and dtype, so state_dict keys and values do not
change. Fusion rewrites only patterns it can prove: a batch norm whose single
consumer is an activation, found in ``nn.Sequential`` containers and, where the
model traces, in the ``torch.fx`` graph of the whole model.
"""
import copy
import warnings
from typing import Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from . import modules
from .ops import Activation

_FASTBN_FOR = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d,
               nn.BatchNorm3d: modules.BatchNorm3d}


def _activation_of(module: nn.Module) -> Optional[Tuple[str, Optional[float]]]:
    """(activation, activation_param) when `module` is an activation fastbn can fuse."""
    if type(module) is nn.ReLU:
        return "relu", None
    if type(module) is nn.LeakyReLU and module.negative_slope > 0:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.ELU:
        return "elu", float(module.alpha)
    if type(module) is nn.SiLU:
        return "silu", None
    return None


_FUNCTIONAL_ACTIVATIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.nn.functional.silu: "silu"}


def _fastbn_from(bn: nn.modules.batchnorm._BatchNorm, activation=None, activation_param=None) -> nn.Module:
    """A fastbn module sharing bn's parameters and buffers, with its settings and mode."""
    fast_cls = next(fast for torch_cls, fast in _FASTBN_FOR.items() if isinstance(bn, torch_cls))
    fast = fast_cls(bn.num_features, activation=activation, activation_param=activation_param)
    for key, value in vars(bn).items():
        # eps, momentum, affine, track_running_stats, training, ...; not an activation set above
        if not key.startswith("_") and key not in ("activation", "activation_param"):
            setattr(fast, key, value)
    fast._parameters.clear()
    fast._parameters.update(bn._parameters)
    fast._buffers.clear()
    fast._buffers.update(bn._buffers)
    return fast


def _is_torch_bn(module: nn.Module) -> bool:
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(
        module, modules._FastBatchNorm)


def _swap(module: nn.Module, fuse_activations: bool) -> nn.Module:
    if _is_torch_bn(module):
        return _fastbn_from(module)
    for name, child in list(module.named_children()):
        setattr(module, name, _swap(child, fuse_activations))
    if fuse_activations and isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            bn, act = module._modules[first], module._modules[second]
            found = _activation_of(act)
            if isinstance(bn, modules._FastBatchNorm) and bn._activation_code == Activation.IDENTITY and found:
                module._modules[first] = _fastbn_from(bn, *found)
                module._modules[second] = nn.Identity()  # keeps the indices, and so the state_dict keys
    return module


class _Tracer(fx.Tracer):
    """fx's tracer with fastbn's modules kept as leaves (their forward checks inputs in Python)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, modules._FastBatchNorm) or super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _call_counts(traced: fx.GraphModule) -> dict:
    counts = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _fuse_in_graph(model: nn.Module) -> nn.Module:
    """Fuse BN -> activation pairs anywhere in the model's fx graph."""
    traced = _trace(model)
    calls = _call_counts(traced)
    changed = False
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(traced.get_submodule(node.target), modules._FastBatchNorm):
            continue
        bn = traced.get_submodule(node.target)
        users = list(node.users)
        if bn._activation_code != Activation.IDENTITY or len(users) != 1 or calls[node.target] != 1:
            continue
        user = users[0]
        found = None
        if user.op == "call_module":
            found = _activation_of(traced.get_submodule(user.target))
        elif user.op == "call_function" and user.target in _FUNCTIONAL_ACTIVATIONS and len(user.args) == 1:
            found = (_FUNCTIONAL_ACTIVATIONS[user.target], None)
        if not found:
            continue
        # The fused module shares the parameters; it takes the BN's name, so the
        # state_dict keys stay the same (a BN module is called once in these graphs).
        traced.add_submodule(node.target, _fastbn_from(bn, *found))
        user.replace_all_uses_with(node)
        traced.graph.erase_node(user)
        changed = True
    if not changed:
        return model
    traced.graph.lint()
    traced.recompile()
    traced.train(model.training)
    return traced


def convert_model(model: nn.Module, fuse_activations: bool = False) -> nn.Module:
    """Return `model` with every torch.nn.BatchNorm1d/2d/3d replaced by fastbn's.

    Parameters and buffers are shared with the original modules (the model is
    converted in place, like torch's convert_sync_batchnorm), so training mode,
    device, dtype and state_dict are unchanged. With ``fuse_activations=True`` a
    batch norm directly followed by ReLU, LeakyReLU (positive slope), ELU or SiLU
    becomes one fused module: in ``nn.Sequential`` by replacing the activation
    with ``nn.Identity``, elsewhere through the model's ``torch.fx`` graph (the
    result is then an ``fx.GraphModule`` with the same parameters); a model that
    does not trace keeps its Sequential fusions only, with a warning.
    """
    model = _swap(model, fuse_activations)
    if fuse_activations and not isinstance(model, modules._FastBatchNorm):
        try:
            model = _fuse_in_graph(model)
        except Exception as error:  # fx cannot trace data-dependent control flow
            warnings.warn(f"fastbn.convert_model: the model does not trace with torch.fx ({error}); "
                          "only batch norms followed by an activation inside nn.Sequential were fused")
    return model


def _fold_sequential(module: nn.Module) -> None:
    for child in module.children():
        _fold_sequential(child)
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        layer, bn = module._modules[first], module._modules[second]
        folded = _fold_pair(layer, bn)
        if folded is not None:
            module._modules[first], module._modules[second] = folded


def _fold_pair(layer: nn.Module, bn: nn.Module):
    """(folded layer, what replaces bn) or None when the pair cannot be folded."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
        return None
    if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not layer.training:
        folded = fuse_conv_bn_eval(layer, bn)
    elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and not layer.training:
        folded = fuse_linear_bn_eval(layer, bn)
    else:
        return None
    code = getattr(bn, "_activation_code", Activation.IDENTITY)
    rest = nn.Identity() if code == Activation.IDENTITY else _activation_module(code, bn._activation_param)
    return folded, rest


def _activation_module(code: int, param: float) -> nn.Module:
    return {Activation.RELU: lambda: nn.ReLU(), Activation.LEAKY_RELU: lambda: nn.LeakyReLU(param),
            Activation.ELU: lambda: nn.ELU(param), Activation.SILU: lambda: nn.SiLU()}[code]()


def _fold_in_graph(model: nn.Module) -> nn.Module:
    traced = _trace(model)
    calls = _call_counts(traced)
    changed = False
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = node.args[0]
        if producer.op != "call_module" or len(producer.users) != 1:
            continue
        if calls[producer.target] != 1 or calls[node.target] != 1:  # a module called twice cannot be folded once
            continue
        folded = _fold_pair(traced.get_submodule(producer.target), traced.get_submodule(node.target))
        if folded is None:
            continue
        # In place, under the same names: conv's weights change, the BN becomes Identity (or its activation).
        traced.add_submodule(producer.target, folded[0])
        traced.add_submodule(node.target, folded[1])
        changed = True
    if not changed:
        return model
    traced.graph.lint()
    traced.recompile()
    traced.eval()
    return traced


def fold_bn(model: nn.Module) -> nn.Module:
    """For inference: fold every eval-mode batch norm into the Conv2d or Linear
    right before it (a bias is created where the layer had none); the output is
    unchanged up to float rounding. Returns a folded copy; `model` is untouched.
    Works in nn.Sequential and, where the model traces, through torch.fx.
    Batch norms in training mode or without running statistics are left as they are.
    """
    model = copy.deepcopy(model)
    _fold_sequential(model)
    try:
        model = _fold_in_graph(model)
    except Exception as error:
        warnings.warn(f"fastbn.fold_bn: the model does not trace with torch.fx ({error}); "
                      "only pairs inside nn.Sequential were folded")
    return model
