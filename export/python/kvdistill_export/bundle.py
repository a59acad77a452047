"""A kvdistill gate bundle (docs/bundle.md), read without kvdistill: kvdistill.json + gates.safetensors."""
import json
from pathlib import Path

import torch
from safetensors import safe_open

FORMAT_VERSION = 1
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class BundleError(ValueError):
    """A bundle that cannot be used: corrupt, of another format version, kind or model."""


class Bundle:
    """The manifest (`manifest`) and the tensors (`tensors`, float32 on the CPU) of a bundle directory."""

    def __init__(self, directory):
        self.dir = Path(directory)
        mpath = self.dir / "kvdistill.json"
        try:
            m = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise BundleError(f"{mpath}: not found; is {self.dir} a kvdistill bundle (`kvdistill export`)?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e}); the bundle is corrupt, export it again") from None
        if not isinstance(m, dict):
            raise BundleError(f"{mpath}: expected a JSON object; the bundle is corrupt, export it again")
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{mpath}: format_version {version}, this reader reads {FORMAT_VERSION}; export the "
                              "bundle again with a matching kvdistill")
        for key in ("kind", "dtype", "tensors", "num_layers", "num_kv_heads", "hidden_size"):
            if key not in m:
                raise BundleError(f"{mpath}: field '{key}' is missing; the bundle is corrupt, export it again")
        if m["dtype"] not in _DTYPES:
            raise BundleError(f"{mpath}: dtype '{m['dtype']}' is not F32, BF16 or F16")
        self.manifest = m
        self.kind = m["kind"]
        tpath = self.dir / "gates.safetensors"
        try:
            with safe_open(str(tpath), framework="pt") as f:
                names = set(f.keys())
                if names != set(m["tensors"]):
                    raise BundleError(f"{tpath}: its tensors differ from the manifest's ({len(names)} vs "
                                      f"{len(m['tensors'])}); the bundle is corrupt, export it again")
                self.tensors = {}
                for n in m["tensors"]:
                    t = f.get_tensor(n)
                    if t.dtype != _DTYPES[m["dtype"]]:
                        raise BundleError(f"{tpath}: tensor '{n}' is {t.dtype}, the manifest says {m['dtype']}")
                    self.tensors[n] = t.float()
        except BundleError:
            raise
        except Exception as e:  # safetensors raises its own errors on truncated / corrupt files
            raise BundleError(f"{tpath}: cannot be read ({e}); the bundle is corrupt, export it again") from None

    def check_model(self, config):
        """Refuses a bundle trained for a model of other dims (`config`: a transformers PretrainedConfig)."""
        text_config = getattr(config, "text_config", config)
        ours = {"num_layers": text_config.num_hidden_layers, "hidden_size": text_config.hidden_size,
                "num_kv_heads": getattr(text_config, "num_key_value_heads", text_config.num_attention_heads)}
        for key, value in ours.items():
            if self.manifest[key] != value:
                raise BundleError(f"{self.dir}: {key} is {self.manifest[key]} in the bundle (trained for model "
                                  f"'{self.manifest.get('base_model', {}).get('id', '?')}') but {value} in this model; "
                                  "use the bundle trained for this model")

    def layer(self, layer, names):
        """The tensors `model.layers.<layer>.self_attn.<kind>.<name>` for each name."""
        prefix = f"model.layers.{layer}.self_attn.{self.kind}."
        return [self.tensors[prefix + n] for n in names]
