"""What the built-in recipe (strata.backbone.tiny) builds differently per family: its tokenizer's
special tokens and chat template, its processor, its model from config, and the vision tower's
tokens that the vision stage supervises (one per cell of the scenes' 3x3 grid).

Two families are built in: LLaVA (`builtin:tiny`, `builtin:test`), a CLIP tower and a Llama LM,
and Qwen2-VL (`builtin:tiny-qwen2vl`, `builtin:test-qwen2vl`), a ViT whose patch merger folds each
2x2 block of 8-pixel patches into one LM token, and a Qwen2 LM with 3-D rope positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from strata.backbone.families.qwen2_vl import ImageOnlyQwen2VLProcessor
from strata.data.template import EOS, IMAGE_TOKEN, LLAVA_CHAT, LLAVA_CHAT_TEMPLATE, Chat

# Qwen's turns: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n
# <|im_start|>assistant\n {answer}<|im_end|>\n". No default system turn: the tiny LM never saw one. The
# space before the answer is this tiny model's own: its small BPE has each word whole after a space
# (" orange"), the form pretraining makes it say; a bare line-initial "orange" would be a rare token
# whose tied embedding no adapter can make the frozen model produce.
QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- (' ' if m['role'] == 'assistant' else '') + c['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
QWEN_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class TinyFamily:
    """How the recipe makes one family's processor and model, and reads its vision tokens."""

    specials: list[str]  # the tokenizer's special tokens, in id order
    named_tokens: dict[str, Any]  # PreTrainedTokenizerFast's named special tokens
    chat: Chat
    processor: Callable[[Any, PreTrainedTokenizerFast], Any]  # (recipe, tokenizer) -> processor
    model: Callable[[Any, Any], torch.nn.Module]  # (recipe, processor) -> a randomly initialised model
    vision: Callable[[torch.nn.Module], torch.nn.Module]  # the part the vision stage trains
    grid_tokens: Callable[[torch.nn.Module, Any, list], torch.Tensor]  # (model, processor, images) -> (B, g, g, W)


def _llava_processor(recipe, tok: PreTrainedTokenizerFast) -> LlavaProcessor:
    # Resized whole to a square, never cropped: an object in a corner of a wide image stays in view.
    square = {"height": recipe.image_size, "width": recipe.image_size}
    images = CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False)
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=recipe.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def _llava_model(recipe, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    w, h = recipe.width, recipe.heads
    vision = CLIPVisionConfig(
        hidden_size=w, intermediate_size=2 * w, num_hidden_layers=recipe.vision_layers,
        num_attention_heads=h, image_size=recipe.image_size, patch_size=recipe.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=w, intermediate_size=2 * w,
        num_hidden_layers=recipe.text_layers, num_attention_heads=h, num_key_value_heads=h,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(recipe.image_size // recipe.patch_size) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a 2-layer tower: LLaVA's usual -2 would leave half of it unused
        projector_hidden_act="gelu", tie_word_embeddings=True,
    )
    torch.manual_seed(recipe.seed)
    return LlavaForConditionalGeneration(config)


def _llava_grid(model, processor, images: list) -> torch.Tensor:
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    tokens = model.model.vision_tower(pixels).last_hidden_state[:, 1:]  # without CLS, as the LM sees them
    g = int(tokens.shape[1] ** 0.5)
    return tokens.reshape(len(tokens), g, g, -1)


LLAVA = TinyFamily(
    specials=["<pad>", "<s>", EOS, IMAGE_TOKEN, "<unk>"],
    named_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": EOS, "unk_token": "<unk>",
                  "extra_special_tokens": {"image_token": IMAGE_TOKEN}},
    chat=LLAVA_CHAT,
    processor=_llava_processor, model=_llava_model,
    vision=lambda model: model.model.vision_tower, grid_tokens=_llava_grid,
)


def _qwen_processor(recipe, tok: PreTrainedTokenizerFast) -> ImageOnlyQwen2VLProcessor:
    side = recipe.image_size * recipe.image_size  # every image resized to image_size x image_size
    images = Qwen2VLImageProcessorPil(patch_size=recipe.patch_size, merge_size=2,
                                      size={"shortest_edge": side, "longest_edge": side})
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_model(recipe, processor: ImageOnlyQwen2VLProcessor) -> Qwen2VLForConditionalGeneration:
    tok = processor.tokenizer
    w, h = recipe.width, recipe.heads
    half = w // h // 2  # rope frequencies per head, split over (time, height, width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * (half // 3), half // 3,
                                                                                half // 3]}
    text = {"vocab_size": len(tok), "hidden_size": w, "intermediate_size": 2 * w,
            "num_hidden_layers": recipe.text_layers, "num_attention_heads": h, "num_key_value_heads": h,
            "max_position_embeddings": 256, "rope_parameters": rope, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"depth": recipe.vision_layers, "embed_dim": w, "hidden_size": w, "num_heads": h, "mlp_ratio": 2,
              "patch_size": recipe.patch_size, "spatial_merge_size": 2}
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    torch.manual_seed(recipe.seed)
    return Qwen2VLForConditionalGeneration(config)


def _qwen_grid(model, processor, images: list) -> torch.Tensor:
    out = processor.image_processor(images, return_tensors="pt")
    merged = model.model.visual(out["pixel_values"], grid_thw=out["image_grid_thw"]).pooler_output
    g = int(out["image_grid_thw"][0, 1]) // 2  # merged tokens per side (2x2 patches each)
    return merged.reshape(len(images), g, g, -1)


QWEN2_VL = TinyFamily(
    specials=QWEN_SPECIALS,
    named_tokens={"pad_token": "<pad>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
                  "extra_special_tokens": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}},
    chat=Chat(QWEN_CHAT_TEMPLATE, {"eos_token": "<|im_end|>"}),
    processor=_qwen_processor, model=_qwen_model,
    vision=lambda model: model.model.visual, grid_tokens=_qwen_grid,
)

TINY_FAMILIES = {"llava": LLAVA, "qwen2_vl": QWEN2_VL}
