"""bulkfm: foundation models for bulk RNA-seq.

Data flows one way: files -> :mod:`bulkfm.data` (AnnData) -> tokenize -> models
-> train -> embed -> tasks -> evaluate/bench. Import the stage you need; heavy
dependencies (torch) are only imported by the stages that use them.
"""

from bulkfm.errors import BulkfmError, BulkfmWarning

__version__ = "0.1.0"
__all__ = ["BulkfmError", "BulkfmWarning", "__version__"]
