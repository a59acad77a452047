"""TensorRT-LLM's sparse-attention contract for dropping KV tokens after prefill, served by a kvdistill bundle.

TensorRT-LLM's PyTorch backend calls `sparse_kv_predict(q, k, metadata, forward_args)` on an attention layer
after the context (prefill) phase and expects:
- `sparse_kv_indices`: int32 (num KV heads, total kept tokens), the kept token indices of each request in its own
  column block, ascending per head;
- `sparse_kv_offsets`: int32 (batch + 1), the column where each request's block starts;
- every KV head keeping the same count within a request.
It then compacts its paged cache to those tokens. Generation steps return (None, None).

`KVDistillSparseKV` computes these with torch.ops.kvdistill.{score, select} from a TRIM-KV bundle. The gate reads
the attention input of the layer (after the input RMSNorm), which the layer must hand over as
`forward_args.hidden_states` (num tokens, hidden size), packed like q. Registering it (docs/serving.md): subclass
the backend's attention class for your model, build one `KVDistillSparseKV(bundle, layer_idx, ...)` per layer,
and return its `sparse_kv_predict(...)` from the class's own.
"""
from dataclasses import dataclass

import torch

from .bundle import Bundle, BundleError
from .ops import load_ops

_RETENTION_TENSORS = ("w1.weight", "w1.bias", "w2.weight", "bias")


def kept_count(length, compression_ratio=None, prompt_budget=None):
    """Tokens each KV head keeps of a `length`-token prompt: min(prompt_budget, length), or kvpress's rule for a
    ratio (int(length · (1 − ratio)), at least 1)."""
    if (compression_ratio is None) == (prompt_budget is None):
        raise ValueError("give exactly one of compression_ratio and prompt_budget")
    if prompt_budget is not None:
        if prompt_budget < 1:
            raise ValueError(f"prompt_budget must be >= 1, got {prompt_budget}")
        return min(prompt_budget, length)
    if not 0 <= compression_ratio < 1:
        raise ValueError(f"compression_ratio must lie in [0, 1), got {compression_ratio}")
    return max(1, int(length * (1 - compression_ratio)))


@dataclass
class KVDistillSparseKV:
    bundle: object          # a Bundle or a bundle directory (kind retention_gate)
    layer_idx: int
    num_heads: int          # query heads (to split TensorRT-LLM's fused qkv)
    num_kv_heads: int
    head_dim: int
    compression_ratio: float = None
    prompt_budget: int = None

    def __post_init__(self):
        if not isinstance(self.bundle, Bundle):
            self.bundle = Bundle(self.bundle)
        if self.bundle.kind != "retention_gate":
            raise BundleError(f"{self.bundle.dir}: a '{self.bundle.kind}' bundle; this backend scores "
                              "retention_gate (TRIM-KV) bundles")
        if self.bundle.manifest["num_kv_heads"] != self.num_kv_heads:
            raise BundleError(f"{self.bundle.dir}: num_kv_heads is {self.bundle.manifest['num_kv_heads']} in the "
                              f"bundle but {self.num_kv_heads} in this layer; use the bundle trained for this model")
        if not 0 <= self.layer_idx < self.bundle.manifest["num_layers"]:
            raise BundleError(f"{self.bundle.dir}: layer {self.layer_idx} is outside the bundle's "
                              f"{self.bundle.manifest['num_layers']} layers")
        kept_count(1, self.compression_ratio, self.prompt_budget)  # validates the budget
        load_ops()
        self._weights = {}

    def _layer(self, device):
        if device not in self._weights:
            self._weights[device] = [t.to(device) for t in self.bundle.layer(self.layer_idx, _RETENTION_TENSORS)]
        return self._weights[device]

    def sparse_kv_predict(self, q, k, metadata, forward_args):
        """q: (num tokens, (H + 2 H_kv) · d) fused qkv when k is None, else (num tokens, H · d) with k
        (num tokens, H_kv · d); metadata: num_contexts, seq_lens, kv_cache_params.num_cached_tokens_per_seq;
        forward_args.hidden_states: (num tokens, D). Returns (indices, offsets) for the context requests."""
        if metadata is None or metadata.num_contexts == 0:
            return None, None
        hidden = getattr(forward_args, "hidden_states", None)
        if hidden is None:
            raise ValueError("KVDistillSparseKV needs forward_args.hidden_states (the layer's attention input "
                             "after its input RMSNorm, packed like q)")
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if k is None else self.num_heads * self.head_dim
        if q.dim() != 2 or q.shape[1] != width:
            raise ValueError(f"q must be (num tokens, {width}) for {self.num_heads} heads, {self.num_kv_heads} KV "
                             f"heads of {self.head_dim}; got {tuple(q.shape)}")
        if hidden.dim() != 2 or hidden.shape[0] != q.shape[0]:
            raise ValueError(f"hidden_states must be (num tokens = {q.shape[0]}, hidden size), got {tuple(hidden.shape)}")
        seq_lens = [int(x) for x in metadata.seq_lens[:metadata.num_contexts]]
        cached = metadata.kv_cache_params.num_cached_tokens_per_seq
        w1, b1, w2, bias = self._layer(hidden.device)
        blocks, offsets, start = [], [0], 0
        for i, n in enumerate(seq_lens):
            if int(cached[i]) != 0:
                raise ValueError(f"request {i}: {int(cached[i])} tokens already cached; this backend compresses a "
                                 "whole prompt in one context step (turn chunked prefill off)")
            x = hidden[start:start + n].unsqueeze(0)                                      # (1, n, D)
            scores = torch.ops.kvdistill.score(x, w1, b1, w2, bias, torch.arange(n, device=x.device), n)
            keep = kept_count(n, self.compression_ratio, self.prompt_budget)
            idx, _ = torch.ops.kvdistill.select(scores, keep)                            # (H_kv, keep)
            blocks.append(idx)
            offsets.append(offsets[-1] + keep)
            start += n
        indices = torch.cat(blocks, dim=1).contiguous()                                  # (H_kv, Σ keep)
        return indices, torch.tensor(offsets, dtype=torch.int32, device=indices.device)
