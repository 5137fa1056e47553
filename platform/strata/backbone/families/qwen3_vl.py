"""Qwen3-VL: a ViT with a merger and "deepstack" mergers that feed early LM layers, a Qwen3 LM.

The vision MLP and the mergers share the leaf names `linear_fc1`/`linear_fc2`, so the projector
is told apart by its path.
"""

from transformers import Qwen3VLProcessor

from strata.backbone.families import Family, register
from strata.backbone.families.qwen2_vl import QWEN_REFUSED


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video half (its video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


QWEN3_VL = register(Family(
    name="qwen3-vl",
    model_types=("qwen3_vl",),
    vision_layers=r"visual\.blocks",
    vision_linears=r"(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))",
    text_layers=r"language_model\.(model\.)?layers",
    projector=r"visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc[12]",
    projector_block="visual.merger",
    vision_parts=("visual",),
    load_processor=ImageOnlyQwen3VLProcessor.from_pretrained,
    refused_kinds=QWEN_REFUSED,
))
