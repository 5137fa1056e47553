"""Trained-looking LoRA adapters on the test backbone, a registry of them, and offline answers to compare with."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from peft import PeftModel

from strata.adapters.lora import add_adapter, save_adapter
from strata.backbone.features import pooled_features
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.registry import Ref, Registry, backbone_info
from strata.routing import ROUTER_FILE, PrototypeRouter


def trained_adapter(backbone, dest: Path, seed: int, ranks: tuple[int, int] = (2, 4)) -> tuple[Path, torch.nn.Module]:
    """A LoRA adapter with non-zero B matrices (so it changes the output), saved in PEFT format."""
    model, _ = backbone
    peft_model = add_adapter(model, "shared", AdapterSpec(visual_rank=ranks[0], text_rank=ranks[1]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return save_adapter(peft_model, "shared", dest), peft_model


def served_registry(tmp: Path, test_spec, backbone_dir: Path) -> Registry:
    """default/seqlora v1 (production) and v2 (candidate); default/colour and default/shape with prototypes."""
    model, processor = load_backbone(test_spec, backbone_dir)
    info = backbone_info(test_spec.source, backbone_dir, model)
    reg = Registry(str(tmp / "registry"))
    for v in (1, 2):
        src, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp / f"s{v}", seed=v)
        reg.push(Ref("default", "seqlora", v), src, {"strategy": "seqlora"}, info)
    reg.promote(Ref("default", "seqlora", 1))
    for seed, task in enumerate(("colour", "shape")):
        src, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp / task, seed=10 + seed)
        train = generate_task(task, 1, n_train=256, n_val=0, n_test=0)
        feats = pooled_features(model, processor, encode_table(processor, train, with_answers=False))
        proto = PrototypeRouter.of(task, feats).save(tmp / f"proto-{task}")
        ref = Ref("default", task, 1)
        reg.push(ref, src, {"strategy": "decoupled"}, info, side={ROUTER_FILE: proto})
        reg.promote(ref)
    return reg


@torch.no_grad()
def offline(reg: Registry, ref: Ref, row: dict, test_spec, backbone_dir, tmp_path, max_tokens: int = 8) -> list[int]:
    """Greedy tokens from plain PEFT on a fresh backbone: what serving must reproduce."""
    model, processor = load_backbone(test_spec, backbone_dir)
    peft = PeftModel.from_pretrained(model, str(reg.fetch(ref, tmp_path / f"{ref.adapter}-v{ref.version}")))
    enc = encode_table(processor, pa.Table.from_pylist([row], generate_task("colour", 0, 0, 0, 0).schema),
                       with_answers=False)
    batch = collate(enc, processor.tokenizer.pad_token_id, left_pad=True)
    batch.pop("labels")
    tok = processor.tokenizer
    out = peft.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id)[0, batch["input_ids"].shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
