"""Qwen2-VL and Qwen2.5-VL: a ViT whose patch merger (the projector) sits inside `visual`, a Qwen2 LM.

Names clash across the towers: Qwen2-VL's `proj` is also its Conv3d patch embedding, and
Qwen2.5-VL's vision MLP uses `gate_proj`, `up_proj` and `down_proj` like the LM. Every regex
here is anchored at its tower, so a side's adapter never lands on the other one.
"""

from strata.backbone.families import Family, register

_COMMON = {
    "vision_layers": r"visual\.blocks",
    "text_layers": r"language_model\.(model\.)?layers",
    "projector": r"visual\.merger\.mlp\.[02]",
    "projector_block": "visual.merger",
    "vision_parts": ("visual",),
}

QWEN2_VL = register(Family(
    name="qwen2-vl", model_types=("qwen2_vl",),
    vision_linears=r"(attn\.(qkv|proj)|mlp\.(fc1|fc2))", **_COMMON,
))

QWEN2_5_VL = register(Family(
    name="qwen2.5-vl", model_types=("qwen2_5_vl",),
    vision_linears=r"(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))", **_COMMON,
))
