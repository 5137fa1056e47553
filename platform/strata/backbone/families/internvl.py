"""InternVL (the `-hf` conversions): an InternViT tower, LLaVA's projector, a Qwen2 LM.

The original InternVL checkpoints need `trust_remote_code`; only the `-hf` conversions load with
transformers' own classes. Each image is cropped into tiles (plus a thumbnail), and the processor
returns every image's tiles in one tensor.
"""

from transformers import InternVLProcessor

from strata.backbone.families import Family, feature_layer_depth, register


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without its video half (its video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs) -> None:
        super().__init__(image_processor, tokenizer, video_processor=None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


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
    load_processor=ImageOnlyInternVLProcessor.from_pretrained,
))
