"""The drift monitor: KL of any set of registry versions against a reference, on an anchor set.

`strata monitor drift` runs it after the fact, as production monitoring of adapter updates asks: the gate
checks drift once before promotion, the monitor can re-check any version set at any time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa

from strata.adapters.lora import load_adapter
from strata.backbone.load import resolve, shared_backbone
from strata.config import BackboneSpec
from strata.data.collate import encode_table
from strata.eval.drift import answer_log_probs, mean_kl
from strata.registry import Ref, Registry, backbone_info


def drift_report(registry: Registry, stream: str, adapter: str, versions: list[int], against: str,
                 anchor: pa.Table) -> dict:
    """KL(reference ‖ version) for each version; the reference is `backbone` or a version (`production`, N)."""
    cards = {v: registry.card(Ref(stream, adapter, v)) for v in versions}
    reference = None if against == "backbone" else registry.resolve(stream, adapter, against)
    first = cards[versions[0]] if versions else registry.card(reference)
    spec = BackboneSpec(first["backbone"]["source"])
    path = resolve(spec)
    model, processor = shared_backbone(spec, path)
    found = backbone_info(spec.source, path, model).fingerprint
    if found != first["backbone"]["fingerprint"]:
        raise ValueError(f"the backbone at {spec.source} has fingerprint {found}, but {stream}/{adapter} was "
                         f"trained on {first['backbone']['fingerprint']}")
    rows = encode_table(processor, anchor, with_answers=True)
    pad = processor.tokenizer.pad_token_id

    def log_probs(ref: Ref | None):
        if ref is None:
            base, _ = shared_backbone(spec, path)
            return answer_log_probs(base, rows, [None] * len(rows), pad)
        with tempfile.TemporaryDirectory() as tmp:
            base, _ = shared_backbone(spec, path)
            tuned = load_adapter(base, registry.fetch(ref, Path(tmp) / "adapter"), "adapter")
            return answer_log_probs(tuned, rows, ["adapter"] * len(rows), pad)

    ref_lp = log_probs(reference)
    drift = []
    for v, card in cards.items():
        kl = mean_kl(ref_lp, log_probs(Ref(stream, adapter, v)))
        drift.append({"version": v, "stage": card["stage"], "task": card.get("task"), "kl": kl,
                      "kl_threshold": (card.get("gate") or {}).get("kl_threshold")})
    return {"adapter": f"{stream}/{adapter}", "against": str(reference or "backbone"),
            "anchor_rows": len(rows), "drift": drift}
