"""A kvpress press that compresses with a kvdistill bundle, scoring and selecting through libkvdistill_ops.so.

    from kvdistill_export.kvpress_press import KVDistillPress
    press = KVDistillPress(bundle="runs/trimkv/bundle", compression_ratio=0.5)
    with press(model):
        model(input_ids, past_key_values=cache)

TRIM-KV (`retention_gate`) bundles: each prompt entry is scored log β · (t + 1 − pos) from the attention input of
its layer (kvpress passes it as `hidden_states`), and each KV head keeps its n_kept highest scores, ties to the
lower position (`torch.ops.kvdistill.select`), compacted in position order (`torch.ops.kvdistill.compact`): the
sets `kvdistill compress --method gate:<bundle> --ratio r` keeps.
"""
from dataclasses import dataclass, field

import torch
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import compute_n_kept

from .bundle import Bundle, BundleError
from .ops import load_ops

_RETENTION_TENSORS = ("w1.weight", "w1.bias", "w2.weight", "bias")


@dataclass
class KVDistillPress(ScorerPress):
    bundle: object = None  # a Bundle or a bundle directory
    compression_ratio: float = 0.0
    _device_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.bundle, Bundle):
            self.bundle = Bundle(self.bundle)
        if self.bundle.kind != "retention_gate":
            raise BundleError(f"{self.bundle.dir}: a '{self.bundle.kind}' bundle; this press scores retention_gate "
                              "(TRIM-KV) bundles")
        load_ops()

    def __call__(self, model):
        self.bundle.check_model(model.config)
        return super().__call__(model)

    def _layer_tensors(self, layer, device):
        key = (layer, device)
        if key not in self._device_cache:
            self._device_cache[key] = [t.to(device) for t in self.bundle.layer(layer, _RETENTION_TENSORS)]
        return self._device_cache[key]

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        n = keys.shape[2]
        positions = torch.arange(n, device=hidden_states.device)
        w1, b1, w2, bias = self._layer_tensors(module.layer_idx, hidden_states.device)
        # the prompt's entries at positions 0..n-1, scored for the next position t = n
        return torch.ops.kvdistill.score(hidden_states, w1, b1, w2, bias, positions, n)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)  # (B, H_kv, n)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        indices, offsets = torch.ops.kvdistill.select(scores, n_kept)
        out = []
        for t in (keys, values):
            t = t.contiguous()
            torch.ops.kvdistill.compact(t, indices, offsets)
            out.append(t.narrow(2, 0, n_kept).contiguous())  # a cache of n_kept rows (the old storage is freed)
        return out[0], out[1]
