"""Merge-for-deploy: fold an adapter into a full-precision copy of its backbone and write a standalone model.

LoRA and DoRA merge with PEFT's own `merge_and_unload` (it gets DoRA's magnitude scaling and rsLoRA
right); BitFit adds its deltas into the biases. The backbone on disk is never written: the merged
model is a new directory (safetensors weights, config, processor) that any LLaVA loader reads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel

from strata.adapters import bitfit, custom
from strata.adapters.lora import SIDE_VERSION, adapter_kind
from strata.atomic import replace_dir
from strata.backbone.load import fingerprint, load_backbone, resolve
from strata.config import BackboneSpec

MERGE_INFO = "strata_merge.json"  # lineage written next to the merged weights
CANNOT_MERGE = {
    "prefix": "prefix tuning adds virtual key/value tokens, not weight deltas, so there is nothing to fold into "
              "the weights; serve it as an adapter",
    "bottleneck": "a bottleneck adapter adds non-linear layers that the backbone's weights cannot express; "
                  "serve it as an adapter",
}


def merge_adapter(backbone_spec: BackboneSpec, backbone_path: Path | None, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the adapter in `adapter_dir` into a full-precision backbone and write the model to `out_dir`
    atomically; `backbone_path` skips resolving the spec when the caller already has the directory."""
    if backbone_spec.quantization is not None:
        raise ValueError(f"merge needs a full-precision base, but backbone.quantization is "
                         f"{backbone_spec.quantization!r}: a merged update would be rounded away. Merge into the "
                         "unquantized source model (an adapter trained on a quantized base merges into it)")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    kind = adapter_kind(adapter_dir)
    if kind in CANNOT_MERGE:
        raise ValueError(f"{kind} adapters cannot be merged: {CANNOT_MERGE[kind]}")
    if kind not in ("lora", "dora", "bitfit"):
        raise ValueError(f"{adapter_dir} holds a {kind!r} adapter; merge handles lora, dora and bitfit")

    backbone_path = Path(backbone_path) if backbone_path is not None else resolve(backbone_spec)
    config_file = backbone_path / "config.json"
    if config_file.exists() and "quantization_config" in json.loads(config_file.read_text()):
        raise ValueError(f"merge needs a full-precision base, but {backbone_path} holds a quantized model "
                         "(its config.json has a quantization_config); merge into the unquantized source model")
    model, processor = load_backbone(backbone_spec, backbone_path)
    if kind == "bitfit":
        config, tensors = custom.read_side(adapter_dir)
        if config.get("version") != SIDE_VERSION:
            raise ValueError(f"{adapter_dir}: bitfit side file version {config.get('version')!r}, "
                             f"expected {SIDE_VERSION}")
        model = bitfit.merge_into(model, tensors)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(str(tmp))  # safetensors
        processor.save_pretrained(str(tmp))
        info = {"kind": kind, "adapter": str(adapter_dir.resolve()), "backbone": backbone_spec.source,
                "backbone_fingerprint": fingerprint(backbone_path)}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
