"""Tiny random models of every supported family, built from config (no weights, no processor)."""

from __future__ import annotations

import transformers

TEXT = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 48, "patch_size": 8}
CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 48, "patch_size": 16}

CONFIGS = {
    "llava": lambda: transformers.LlavaConfig(vision_config=CLIP, text_config={"model_type": "llama", **TEXT},
                                              image_token_index=95),
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config={**TEXT, "rope_parameters": QWEN_ROPE},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 8}),
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config={**TEXT, "rope_parameters": QWEN_ROPE},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": 8, "window_size": 32, "fullatt_block_indexes": [1]}),
    "qwen3_vl": lambda: transformers.Qwen3VLConfig(
        text_config={**TEXT, "head_dim": 16, "rope_parameters": {**QWEN_ROPE, "mrope_section": [4, 2, 2],
                                                                  "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}),
    "llava_onevision": lambda: transformers.LlavaOnevisionConfig(
        vision_config={**SIGLIP, "vision_use_head": False}, text_config={"model_type": "qwen2", **TEXT},
        vision_feature_layer=-1),
    "idefics3": lambda: transformers.Idefics3Config(
        vision_config={k: v for k, v in SIGLIP.items() if k != "model_type"}, text_config={"model_type": "llama", **TEXT}),
    "smolvlm": lambda: transformers.SmolVLMConfig(
        vision_config={k: v for k, v in SIGLIP.items() if k != "model_type"}, text_config={"model_type": "llama", **TEXT}),
    "gemma3": lambda: transformers.Gemma3Config(
        vision_config=SIGLIP, mm_tokens_per_image=9,
        text_config={**TEXT, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}),
    "internvl": lambda: transformers.InternVLConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": [48, 48], "patch_size": [8, 8]},
        text_config={"model_type": "qwen2", **TEXT}, image_seq_length=9),
}


def tiny_model(model_type: str):
    """A randomly initialised tiny model of `model_type`, frozen as a backbone is."""
    model = transformers.AutoModelForImageTextToText.from_config(CONFIGS[model_type]())
    return model.requires_grad_(False).eval()
