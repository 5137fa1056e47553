"""Qwen2-VL and Qwen2.5-VL: a ViT whose patch merger (the projector) sits inside `visual`, a Qwen2 LM.

Names clash across the towers: Qwen2-VL's `proj` is also its Conv3d patch embedding, and
Qwen2.5-VL's vision MLP uses `gate_proj`, `up_proj` and `down_proj` like the LM. Every regex
here is anchored at its tower, so a side's adapter never lands on the other one.
"""

from transformers import Qwen2VLProcessor

from strata.backbone.families import Family, register


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video half.

    transformers builds a Qwen processor only with a video processor, and video processors need
    torchvision, which has no build for a CPU-only torch. Strata passes images only, so this class
    leaves the video processor out; everything else is Qwen2VLProcessor's. Loaded from a
    checkpoint, it takes the PIL image processor whichever one the checkpoint names.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


# Qwen's 3-D rope positions are computed from the ids and the attention mask together.
QWEN_REFUSED = {"prefix": "PEFT lengthens the attention mask by the virtual tokens but not the input ids, and "
                          "Qwen's 3-D rope positions are computed from both, so the forward fails"}

_COMMON = {
    "vision_layers": r"visual\.blocks",
    "text_layers": r"language_model\.(model\.)?layers",
    "projector": r"visual\.merger\.mlp\.[02]",
    "projector_block": "visual.merger",
    "vision_parts": ("visual",),
    "load_processor": ImageOnlyQwen2VLProcessor.from_pretrained,
    "refused_kinds": QWEN_REFUSED,
}

QWEN2_VL = register(Family(
    name="qwen2-vl", model_types=("qwen2_vl",),
    vision_linears=r"(attn\.(qkv|proj)|mlp\.(fc1|fc2))", **_COMMON,
))

QWEN2_5_VL = register(Family(
    name="qwen2.5-vl", model_types=("qwen2_5_vl",),
    vision_linears=r"(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))", **_COMMON,
))
