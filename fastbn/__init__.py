"""fastbn: fused batch normalization for PyTorch.

    import fastbn
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), fastbn.BatchNorm2d(64), torch.nn.ReLU())
"""
import torch  # noqa: F401  (load torch's shared libraries before the extension, which has no rpath)

from . import functional, interop, ops
from .convert import convert_model, fold_bn
from .functional import batch_norm, batch_norm_act, batch_norm_add_act
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync_batchnorm import SyncBatchNorm

# torch.ao.quantization.fuse_modules(..., fuse_custom_config_dict={"additional_fuser_method_mapping": this})
FUSER_METHOD_MAPPING = interop.fuser_method_mapping()

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FUSER_METHOD_MAPPING", "SyncBatchNorm", "batch_norm",
           "batch_norm_act", "batch_norm_add_act", "convert_model", "fold_bn", "functional", "interop", "ops"]
