"""The article's MNIST CNN, with torch's, fastbn's or no batch norm, and its initial weights."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .errors import UsageError

# The layout the CLI trains in (--memory-format). channels_last by default: torch's CPU
# max-pool forward is 6-12x slower on NCHW than on channels_last (torch 2.14, 2 threads,
# (250,32,26,26): 29.6 against 4.6 ms), a fifth of every NCHW training step. The model
# computes the same function either way (Flatten reads the logical NCHW order).
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
DEFAULT_MEMORY_FORMAT = "channels_last"


def batchnorm_classes(bn: str):
    """(BatchNorm2d, BatchNorm1d) classes for a variant, or None for 'none'.

    fastbn is imported only here, so '--bn torch' and '--bn none' keep working
    while the C++/CUDA extension is not built.
    """
    if bn == "none":
        return None
    if bn == "torch":
        return nn.BatchNorm2d, nn.BatchNorm1d
    if bn == "fastbn":
        fastbn = _import_fastbn("--bn fastbn", "or use --bn torch / none")
        return fastbn.BatchNorm2d, fastbn.BatchNorm1d
    raise ValueError(f"unknown batch-norm variant {bn!r}")


def _import_fastbn(option: str, alternative: str):
    try:
        import fastbn

        fastbn.BatchNorm2d, fastbn.SyncBatchNorm  # noqa: B018  (an unbuilt package fails here)
        return fastbn
    except (ImportError, AttributeError, OSError) as e:
        raise UsageError(
            f"{option} needs the fastbn extension ({type(e).__name__}: {e}); build it with "
            f"'pip install --no-build-isolation -e .' {alternative}"
        ) from e


def convert_to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every batch norm (torch's or fastbn's) becomes fastbn.SyncBatchNorm with the
    same parameters and state_dict keys. torch.nn.SyncBatchNorm is not used even
    for --bn torch: DistributedDataParallel refuses it on CPU."""
    fastbn = _import_fastbn("--sync-bn", "or leave out --sync-bn")
    return fastbn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_model(bn: str) -> nn.Sequential:
    """The article's CNN; BN layers where the article has them (none for bn='none').

    Layer names are fixed, so the conv/linear parameters of every variant have
    the same state_dict keys and the torch and fastbn variants have identical
    key sets: a state_dict moves between them unchanged.
    """
    classes = batchnorm_classes(bn)
    layers = []

    def add(name, module):
        layers.append((name, module))

    def add_bn(name, features, two_d=True):
        if classes is not None:
            add(name, classes[0](features) if two_d else classes[1](features))

    # Article order: Conv-ReLU-BN-Pool-BN-Conv-ReLU-BN-Pool-BN-Flatten-Dense-ReLU-BN-Dense.
    add("conv1", nn.Conv2d(1, 32, kernel_size=3))  # 28x28 -> 26x26
    add("relu1", nn.ReLU())
    add_bn("bn1", 32)
    add("pool1", nn.MaxPool2d(2))  # -> 13x13
    add_bn("bn2", 32)
    add("conv2", nn.Conv2d(32, 64, kernel_size=3))  # -> 11x11
    add("relu2", nn.ReLU())
    add_bn("bn3", 64)
    add("pool2", nn.MaxPool2d(2))  # -> 5x5
    add_bn("bn4", 64)
    add("flatten", nn.Flatten())
    add("fc1", nn.Linear(64 * 5 * 5, 256))
    add("relu3", nn.ReLU())
    add_bn("bn5", 256, two_d=False)
    add("fc2", nn.Linear(256, 10))  # logits; softmax is folded into cross_entropy
    return nn.Sequential(OrderedDict(layers))


def init_weights(model: nn.Sequential, seed: int) -> None:
    """Keras' default initialisation (Glorot-uniform kernels, zero biases).

    The numbers come from a generator of their own seeded by `seed` and are
    drawn in a fixed layer order, so all three variants start from the same
    conv/linear weights, whatever the BN modules' constructors do with the
    global RNG. BN layers keep their own init (weight 1, bias 0).
    """
    gen = torch.Generator().manual_seed(seed)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer = getattr(model, name)
        with torch.no_grad():
            weight = torch.empty(layer.weight.shape)
            nn.init.xavier_uniform_(weight, generator=gen)
            layer.weight.copy_(weight)
            layer.bias.zero_()


def make_model(bn: str, seed: int, memory_format: str = DEFAULT_MEMORY_FORMAT) -> nn.Sequential:
    """The CLI's model: build_model's layers, init_weights' numbers, in the given memory
    format (a key of MEMORY_FORMATS; the convolutions' outputs follow their weights')."""
    if memory_format not in MEMORY_FORMATS:
        raise UsageError(f"unknown memory format {memory_format!r} (choose from {', '.join(MEMORY_FORMATS)})")
    model = build_model(bn)
    init_weights(model, seed)
    return model.to(memory_format=MEMORY_FORMATS[memory_format])
