"""InternVL (the `-hf` conversions): an InternViT tower, LLaVA's projector, a Qwen2 LM.

The original InternVL checkpoints need `trust_remote_code`; only the `-hf` conversions load with
transformers' own classes.
"""

from strata.backbone.families import Family, feature_layer_depth, register

INTERNVL = register(Family(
    name="internvl",
    model_types=("internvl",),
    vision_layers=r"vision_tower\.encoder\.layer",
    vision_linears=r"(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2))",
    text_layers=r"language_model\.(model\.)?layers",
    projector=r"multi_modal_projector\.linear_[12]",
    projector_block="multi_modal_projector",
    vision_parts=("vision_tower", "multi_modal_projector"),
    depth=feature_layer_depth,
))
