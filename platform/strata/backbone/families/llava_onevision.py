"""LLaVA-OneVision: a SigLIP tower read at any resolution (tiles), LLaVA's projector, a Qwen2 LM.

Its modules are named as LLaVA's; only the chat template (Qwen's turns, shipped with every
checkpoint) differs.
"""

from dataclasses import replace

from strata.backbone.families import register
from strata.backbone.families.llava import LLAVA

ONEVISION = register(replace(LLAVA, name="llava-onevision", model_types=("llava_onevision",), chat_template=None))
