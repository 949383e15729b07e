"""``fastbn-mnist``: train the article's small MNIST CNN with and without batch norm.

The project began from an article that trains a Keras CNN on MNIST and reports
about 0.97 accuracy without batch normalization and about 0.992 with it. This
is that experiment in PyTorch, with the batch-norm layers taken from
``torch.nn`` or from ``fastbn`` so that the two implementations can be compared
on a real training run:

    fastbn-mnist                         # quick default run (torch BN, 2 epochs)
    fastbn-mnist --bn fastbn
    fastbn-mnist --compare --epochs 25   # the article: none vs torch vs fastbn

Everything a run produces goes to ``--out``: per-epoch metrics (CSV and JSON),
PNG plots and a checkpoint after every epoch that ``--resume`` continues from,
giving exactly the result an uninterrupted run would have given.

Data-parallel training: launched by torchrun with several processes, each one
trains on its share of every global batch (gloo on CPU, NCCL with one GPU per
process), gradients are averaged by DistributedDataParallel, and --sync-bn
computes the batch-norm statistics over the whole global batch:

    torchrun --nproc-per-node 2 -m fastbn.mnist --bn fastbn --sync-bn

The global batch is --batch-size whatever the number of processes, and the
processes split exactly the batches one process would train on, so with
--sync-bn (or --bn none) a run computes what a single process computes, up to
floating-point rounding.

The package, one concern a module: ``cli`` (options, run, main), ``model``, ``data``
(the raw files and the training tensors), ``train`` (epochs, evaluation, fit),
``checkpoint``, ``distributed`` (device and processes), ``report`` (metrics, plots,
the table) and ``errors``. What callers use is importable from ``fastbn.mnist`` itself.
"""
from .checkpoint import load_checkpoint, run_config, save_checkpoint
from .cli import DEFAULT_EPOCHS, VARIANTS, _int_at_least, build_parser, main, run
from .data import Data, DataUnavailable, prepare_data
from .distributed import SINGLE, PeerFailed, World
from .errors import PROG, UsageError
from .model import (DEFAULT_MEMORY_FORMAT, MEMORY_FORMATS, batchnorm_classes, build_model, convert_to_sync_batchnorm,
                    init_weights, make_model)
from .train import epoch_generator, evaluate, fit, local_share, smallest_batch, summary, train_epoch

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_MEMORY_FORMAT", "MEMORY_FORMATS", "PROG", "SINGLE", "VARIANTS", "Data",
           "DataUnavailable", "PeerFailed", "UsageError", "World", "batchnorm_classes", "build_model", "build_parser", "convert_to_sync_batchnorm",
           "epoch_generator", "evaluate", "fit", "init_weights", "load_checkpoint", "local_share", "main",
           "make_model", "prepare_data", "run", "run_config", "save_checkpoint", "smallest_batch", "summary",
           "train_epoch"]
