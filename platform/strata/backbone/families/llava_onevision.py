"""LLaVA-OneVision: a SigLIP tower read at any resolution (tiles), LLaVA's projector, a Qwen2 LM."""

from strata.backbone.families import CLIP_LINEARS, Family, feature_layer_depth, register

ONEVISION = register(Family(
    name="llava-onevision",
    model_types=("llava_onevision",),
    vision_layers=r"vision_tower\.(vision_model\.)?encoder\.layers",
    vision_linears=CLIP_LINEARS,
    text_layers=r"language_model\.(model\.)?layers",
    projector=r"multi_modal_projector\.linear_[12]",
    projector_block="multi_modal_projector",
    vision_parts=("vision_tower", "multi_modal_projector"),
    depth=feature_layer_depth,
))
