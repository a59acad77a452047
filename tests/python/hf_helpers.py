"""transformers-side helpers shared by the serving tests: a prompt that fits the tiny model, and the attention
inputs of a prefill, read with hooks on transformers' own modules."""
import torch

# ~170 tokens of varied text (the tiny model has 256 positions)
PROMPT = " ".join(f"Parcel {1000 + 37 * i} left {['Lyon', 'Porto', 'Oslo', 'Quito', 'Accra'][i % 5]} at "
                  f"{7 + i % 11}:{(13 * i) % 60:02d}." for i in range(14))


def attention_inputs(model, ids):
    """Per layer, the attention input (after the input RMSNorm) of a prefill: [L] (T, D)."""
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, l=l: seen.__setitem__(l, kwargs["hidden_states"][0].detach().clone()),
        with_kwargs=True) for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [seen[l] for l in range(len(model.model.layers))]
