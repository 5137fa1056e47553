"""Gemma 3: a SigLIP tower, a projector that is a bare matrix after pooling, a Gemma 3 LM."""

from strata.backbone.families import CLIP_LINEARS, Family, register

GEMMA3 = register(Family(
    name="gemma3",
    model_types=("gemma3",),
    vision_layers=r"vision_tower\.(vision_model\.)?encoder\.layers",
    vision_linears=CLIP_LINEARS,
    text_layers=r"language_model\.(model\.)?layers",
    projector=None,  # mm_input_projection_weight is an nn.Parameter, not a Linear: no LoRA there
    projector_block="multi_modal_projector",
    vision_parts=("vision_tower", "multi_modal_projector"),
    note="the projector is a bare weight matrix: LoRA, DoRA and BitFit leave it frozen, a bottleneck "
         "adapter follows it",
))
