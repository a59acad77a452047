"""A kvpress press that compresses with a kvdistill bundle, selecting and compacting through libkvdistill_ops.so.

    from kvdistill_export.kvpress_press import KVDistillPress
    press = KVDistillPress(bundle="runs/trimkv/bundle", compression_ratio=0.5)
    with press(model):
        model(input_ids, past_key_values=cache)

One class, two kinds of bundle; each keeps, per layer and KV head, the sets `kvdistill compress --method
gate:<bundle> --ratio r` keeps: the n_kept highest scores, ties to the lower position
(`torch.ops.kvdistill.select`), compacted in position order (`torch.ops.kvdistill.compact`).

- `retention_gate` (TRIM-KV): each prompt entry is scored log β · (t + 1 − pos) from the attention input of its
  layer (kvpress passes it as `hidden_states`, `torch.ops.kvdistill.score`), layer by layer during the prefill.
- `query_rows` without LoRA (Judge-Q): once the prompt's prefill has returned, the bundle's n rows run through the
  model as extra positions N .. N+n−1 against the prompt's cache (each row sees the whole prompt and the rows
  before it). Entry j of a layer scores the rows' mean softmax attention to it, averaged over the query heads of
  its KV head, pooled over neighbours as the bundle says; the rows' K/V are then dropped, and every layer is
  compressed. This is kvdistill's QueryRows scorer (gates/query_rows.cpp). LookaheadKV bundles (the same kind
  with LoRA on the rows) are refused.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import compute_n_kept, get_prerope_query_states
from transformers import QuantizedCache
from transformers.models.llama.modeling_llama import rotate_half

from .bundle import Bundle, BundleError
from .ops import load_ops

_RETENTION_TENSORS = ("w1.weight", "w1.bias", "w2.weight", "bias")
_ROWS = "kvdistill.query_rows.rows"
_POOLINGS = ("none", "mean", "max")


def _check_judgeq(bundle):
    """Refuses a query_rows bundle this press cannot run as kvdistill does: LoRA on the rows (LookaheadKV), another
    score, an unknown pooling, rows of the wrong shape."""
    m, where = bundle.manifest, bundle.dir
    lora = [n for n in m["tensors"] if n.startswith("model.layers.")]
    if m.get("lora_targets", "none") != "none" or lora:
        raise BundleError(f"{where}: a LookaheadKV bundle (query_rows with LoRA on {m.get('lora_targets', '?')}); this "
                          "press runs query_rows bundles without LoRA (Judge-Q) and retention_gate (TRIM-KV) ones; "
                          f"compress with `kvdistill compress --method gate:{where}`, or train with "
                          "component.preset=judgeq")
    if m.get("score") != "query_row_attention":
        raise BundleError(f"{where}: the manifest's score is '{m.get('score', 'missing')}', not query_row_attention; "
                          "export the bundle again")
    for key in ("rows", "pooling", "pool_kernel"):
        if key not in m:
            raise BundleError(f"{where}/kvdistill.json: field '{key}' is missing; the bundle is corrupt, export it "
                              "again")
    if m["pooling"] not in _POOLINGS:
        raise BundleError(f"{where}: pooling '{m['pooling']}' is not none, mean or max; export the bundle again")
    k = m["pool_kernel"]
    if not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise BundleError(f"{where}: pool_kernel {k} is not an odd integer >= 1; export the bundle again")
    rows = bundle.tensors.get(_ROWS)
    if rows is None or tuple(rows.shape) != (m["rows"], m["hidden_size"]):
        raise BundleError(f"{where}: tensor '{_ROWS}' is {None if rows is None else tuple(rows.shape)}, expected "
                          f"({m['rows']}, {m['hidden_size']}); the bundle is corrupt, export it again")


def _row_attention(module, hidden, keys, position_embeddings, prompt_len):
    """One layer's mean attention of the rows to the prompt's entries, per KV head: (B, H_kv, N) in float32
    (float64 for a float64 model), as kvdistill's Model::forward_extra and QueryRows compute it.

    hidden: (B, n, D) the rows' attention input (after the layer's input RMSNorm); keys: (B, H_kv, N + n, hd) the
    layer's cache after the rows' own keys were appended; position_embeddings: the rows' RoPE (cos, sin), each
    (B, n, hd)."""
    B, n, _ = hidden.shape
    Hkv, S, hd = keys.shape[1], keys.shape[2], keys.shape[3]
    N = prompt_len
    if S != N + n:
        raise ValueError(f"KVDistillPress: layer {module.layer_idx} holds {S} entries after the rows, expected the "
                         f"prompt's {N} plus {n} rows; use a full DynamicCache (no sliding-window or static cache)")
    cos, sin = position_embeddings
    q = get_prerope_query_states(module, hidden)                              # (B, H, n, hd)
    q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)              # after RoPE, as the layer's own
    G = q.shape[1] // Hkv
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    qg = q.reshape(B, Hkv, G, n, hd).to(acc)                                  # (B, H_kv, G, n, hd): head h reads h / G
    kt = keys.to(acc).unsqueeze(2).transpose(-1, -2)                          # (B, H_kv, 1, hd, N + n)
    logits = torch.matmul(qg, kt) * (1.0 / math.sqrt(hd))                     # (B, H_kv, G, n, N + n)
    # Row i (position N + i) sees every prompt entry and the rows j <= i (and, in a windowed layer, only the
    # entries less than the window behind it).
    kpos = torch.arange(S, device=keys.device)                                # (N + n)
    qpos = torch.arange(N, N + n, device=keys.device)                         # (n)
    vis = kpos.view(1, S) <= qpos.view(n, 1)                                  # (n, N + n)
    window = getattr(module, "sliding_window", None)
    if window:
        vis = vis & ((qpos.view(n, 1) - kpos.view(1, S)) < window)
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1)            # (B, H_kv, G, n, N + n)
    return p[..., :N].mean(3).mean(2)                                         # (B, H_kv, N): rows, then the group


def _pool(s, pooling, kernel):
    """Neighbour pooling of scores (B, H_kv, N) along N, zero padding counted (kvdistill's pool_scores)."""
    if pooling == "none" or kernel <= 1:
        return s
    if pooling == "mean":
        return F.avg_pool1d(s, kernel, stride=1, padding=kernel // 2, ceil_mode=False, count_include_pad=True)
    return F.max_pool1d(s, kernel, stride=1, padding=kernel // 2)


@dataclass
class KVDistillPress(ScorerPress):
    bundle: object = None  # a Bundle or a bundle directory
    compression_ratio: float = 0.0
    _device_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.bundle, Bundle):
            self.bundle = Bundle(self.bundle)
        if self.bundle.kind == "query_rows":
            _check_judgeq(self.bundle)
        elif self.bundle.kind != "retention_gate":
            raise BundleError(f"{self.bundle.dir}: a '{self.bundle.kind}' bundle; this press runs retention_gate "
                              "(TRIM-KV) and query_rows without LoRA (Judge-Q) bundles")
        load_ops()

    def __call__(self, model):
        self.bundle.check_model(model.config)
        if self.bundle.kind == "query_rows":
            return self._after_prefill(model)
        return super().__call__(model)

    # ---- retention_gate: scored layer by layer during the prefill (kvpress's hooks) -------------------------

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
        return self._keep(scores, keys, values)

    def _keep(self, scores, keys, values):
        """The n_kept best entries of each head, (B, H_kv, n_kept, hd) keys and values in position order."""
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        indices, offsets = torch.ops.kvdistill.select(scores, n_kept)
        out = []
        for t in (keys, values):
            t = t.contiguous()
            torch.ops.kvdistill.compact(t, indices, offsets)
            out.append(t.narrow(2, 0, n_kept).contiguous())  # a cache of n_kept rows (the old storage is freed)
        return out[0], out[1]

    # ---- query_rows (Judge-Q): scored once the prompt's prefill has returned --------------------------------

    @contextmanager
    def _after_prefill(self, model):
        """Wraps the decoder's forward: a prefill (a forward into an empty cache) returns with its cache compressed."""
        decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
        own = "forward" in vars(decoder)
        original = decoder.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            self._compress_prefill(decoder, original, out, kwargs)
            return out

        decoder.forward = forward
        try:
            yield
        finally:
            if own:
                decoder.forward = original
            else:
                del decoder.forward

    def _compress_prefill(self, decoder, forward, out, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise ValueError("KVDistillPress: the forward kept no KV cache to compress; call the model with "
                             "use_cache=True and past_key_values=DynamicCache()")
        T = out[0].shape[1]  # the forward's positions (last_hidden_state (B, T, D))
        N = cache.get_seq_length()
        if N != T or self.compression_ratio == 0:
            return  # not a prefill (the cache held entries before), or nothing to remove
        if isinstance(cache, QuantizedCache):
            raise ValueError("KVDistillPress: a QuantizedCache; the query_rows press compresses a DynamicCache")
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("KVDistillPress: the batch has padding (attention_mask holds zeros); the query_rows press "
                             "compresses prompts of one length: run them one at a time")
        scores = self.score_rows(decoder, forward, cache)  # [layer] (B, H_kv, N)
        for l, s in enumerate(scores):
            layer = cache.layers[l]
            layer.keys, layer.values = self._keep(s, layer.keys, layer.values)

    def score_rows(self, decoder, forward, cache):
        """Runs the bundle's rows after the N-token prompt held in `cache` and returns each layer's scores, [layer]
        (B, H_kv, N) float32 (higher keeps). The cache holds the prompt alone again afterwards.

        decoder: the transformers decoder (`model.model`), forward: its unwrapped forward."""
        layers = decoder.layers
        N = cache.get_seq_length()
        for l in range(len(layers)):
            if cache.layers[l].keys.shape[2] != N:
                raise ValueError(f"KVDistillPress: layer {l} holds {cache.layers[l].keys.shape[2]} entries of the "
                                 f"{N}-token prompt; use a full DynamicCache (no sliding-window or static cache)")
        k0 = cache.layers[0].keys                                                   # (B, H_kv, N, hd)
        B, device = k0.shape[0], k0.device
        rows = self.bundle.tensors[_ROWS].to(device, k0.dtype)                      # (n, D)
        n = rows.shape[0]
        attention = [None] * len(layers)

        def hook(module, args, kwargs, output):
            keys = cache.layers[module.layer_idx].keys                              # (B, H_kv, N + n, hd)
            attention[module.layer_idx] = _row_attention(module, kwargs["hidden_states"], keys,
                                                         kwargs["position_embeddings"], N)

        hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
        seen = [getattr(layer, "cumulative_length", None) for layer in cache.layers]
        positions = torch.arange(N, N + n, device=device)                           # (n)
        try:
            with torch.no_grad():
                forward(inputs_embeds=rows.unsqueeze(0).expand(B, n, rows.shape[1]), past_key_values=cache,
                        position_ids=positions.unsqueeze(0).expand(B, n), cache_position=positions, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
            for layer, c in zip(cache.layers, seen):  # the rows' K/V out again: the prompt's N entries
                layer.keys = layer.keys[:, :, :N].contiguous()
                layer.values = layer.values[:, :, :N].contiguous()
                if c is not None:
                    layer.cumulative_length = c
        m = self.bundle.manifest
        return [_pool(a.float(), m["pooling"], m["pool_kernel"]) for a in attention]  # [layer] (B, H_kv, N)
