"""Training: masked-LM pre-training of BulkRNABert (``pretrain``) and its pieces.

Import the submodules directly (``bulkfm.train.pretrain``, ``bulkfm.train.masking``);
this package stays import-light so ``bulkfm --help`` does not load torch.
"""

from bulkfm.train.config import (
    DataSection,
    MaskingConfig,
    OptimSection,
    PretrainConfig,
)

__all__ = ["DataSection", "MaskingConfig", "OptimSection", "PretrainConfig"]
