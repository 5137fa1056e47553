"""LLaVA (1.5 and the built-in `builtin:tiny`): a CLIP tower, a two-layer projector, a Llama LM."""

from strata.backbone.families import CLIP_LINEARS, Family, feature_layer_depth, register
from strata.data.template import LLAVA_CHAT_TEMPLATE

LLAVA = register(Family(
    name="llava",
    model_types=("llava",),
    vision_layers=r"vision_tower\.(vision_model\.)?encoder\.layers",
    vision_linears=CLIP_LINEARS,
    text_layers=r"language_model\.(model\.)?layers",
    projector=r"multi_modal_projector\.linear_[12]",
    projector_block="multi_modal_projector",
    vision_parts=("vision_tower", "multi_modal_projector"),
    depth=feature_layer_depth,
    chat_template=LLAVA_CHAT_TEMPLATE,  # LLaVA-1.5's turns; the built-in backbone saves it too
))
