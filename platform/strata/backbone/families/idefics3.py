"""Idefics3 and SmolVLM: a SigLIP tower, a pixel-shuffle connector, a Llama LM named `text_model`."""

from strata.backbone.families import CLIP_LINEARS, Family, register

IDEFICS3 = register(Family(
    name="idefics3",
    model_types=("idefics3", "smolvlm"),
    vision_layers=r"vision_model\.encoder\.layers",
    vision_linears=CLIP_LINEARS,
    text_layers=r"text_model\.(model\.)?layers",
    projector=r"connector\.modality_projection\.proj",
    projector_block="connector",
    vision_parts=("vision_model", "connector"),
))
