"""kvdistill bundles outside kvdistill (docs/serving.md).

- `Bundle`: reads and checks a bundle directory (docs/bundle.md) with the safetensors package alone.
- `load_ops()`: loads libkvdistill_ops.so, after which `torch.ops.kvdistill.{score, select, compact}` exist.
- `KVDistillPress` (kvdistill_export.kvpress_press): a kvpress press that compresses with a TRIM-KV or Judge-Q
  bundle, selecting and compacting through the ops.
"""
from .bundle import Bundle, BundleError
from .ops import load_ops

__all__ = ["Bundle", "BundleError", "load_ops"]
