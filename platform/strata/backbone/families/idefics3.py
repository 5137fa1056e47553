"""Idefics3 and SmolVLM: a SigLIP tower, a pixel-shuffle connector, a Llama LM named `text_model`.

SmolVLM is Idefics3's architecture; only its processor differs: that class wants a video
processor (which needs torchvision), so the smolvlm description loads an images-only subclass.
"""

from dataclasses import replace

from transformers import SmolVLMProcessor

from strata.backbone.families import CLIP_LINEARS, Family, register


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video half."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                 **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template,
                         **kwargs)


IDEFICS3 = register(Family(
    name="idefics3",
    model_types=("idefics3",),
    vision_layers=r"vision_model\.encoder\.layers",
    vision_linears=CLIP_LINEARS,
    text_layers=r"text_model\.(model\.)?layers",
    projector=r"connector\.modality_projection\.proj",
    projector_block="connector",
    vision_parts=("vision_model", "connector"),
))

SMOLVLM = register(replace(IDEFICS3, name="smolvlm", model_types=("smolvlm",),
                           load_processor=ImageOnlySmolVLMProcessor.from_pretrained))
