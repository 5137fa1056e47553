"""LLaVA-OneVision: a SigLIP tower read at any resolution (tiles), LLaVA's projector, a Qwen2 LM.

Its modules are named as LLaVA's; its chat template (Qwen's turns) ships with every checkpoint.
Each image becomes a base tile plus the tiles of its best grid, so a batch's `pixel_values` has
one row of tiles per image, padded to the longest, and `image_sizes` tells the model how many
tiles of each row are real.
"""

from dataclasses import replace

from transformers import LlavaOnevisionProcessor

from strata.backbone.families import register
from strata.backbone.families.llava import LLAVA


class ImageOnlyOneVisionProcessor(LlavaOnevisionProcessor):
    """OneVision's processor without its video half (its video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 vision_aspect_ratio="anyres_max_9", **kwargs) -> None:
        super().__init__(image_processor, tokenizer, video_processor=None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs)


ONEVISION = register(replace(LLAVA, name="llava-onevision", model_types=("llava_onevision",), chat_template=None,
                             load_processor=ImageOnlyOneVisionProcessor.from_pretrained))
