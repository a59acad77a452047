"""Finding and loading libkvdistill_ops.so (built by kvdistill's CMake next to the `kvdistill` binary)."""
import os
from pathlib import Path

import torch

_loaded = None


def load_ops(path=None):
    """Loads the operator library once; returns its path. Looks at `path`, then $KVD_OPS_LIB, then the build/
    folder of the kvdistill checkout this package sits in."""
    global _loaded
    if _loaded is not None:
        return _loaded
    candidates = [path, os.environ.get("KVD_OPS_LIB"),
                  Path(__file__).resolve().parents[3] / "build" / "libkvdistill_ops.so"]
    for c in candidates:
        if c and Path(c).is_file():
            torch.ops.load_library(str(c))
            _loaded = str(c)
            return _loaded
    raise FileNotFoundError(
        "libkvdistill_ops.so not found (looked at: " + ", ".join(str(c) for c in candidates if c) +
        "); build kvdistill (`cmake --build build --target kvdistill_ops`) and pass its path or set KVD_OPS_LIB")
