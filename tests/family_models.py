"""Tiny random models of every supported family, built from config (no weights, no processor)."""

from __future__ import annotations

import torch
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
        vision_config={**SIGLIP, "patch_size": 16, "vision_use_head": False}, text_config={"model_type": "qwen2", **TEXT},
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


# ---- whole checkpoints (model, processor and chat template) for the families Strata trains ------

QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ONEVISION_CHAT = QWEN_CHAT.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")  # Qwen's turns
INTERNVL_CHAT = QWEN_CHAT.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>")
GEMMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
IDEFICS3_CHAT = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
WORDS = ["what", "colour", "shape", "is", "the", "a", "of", "in", "on", "how", "many", "objects", "are", "there",
         "where", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "star",
         "left", "right", "above", "below", "yes", "no", "user", "assistant", "large", "small"]


def tokenizer(specials: list[str], extra: dict[str, str], **named):
    """A small byte-level BPE that keeps the built-in stream's words and the family's markers whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<unk>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS), *(f" {w}" for w in WORDS)] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                extra_special_tokens=extra, **named)


def save_checkpoint(model_type: str, path) -> None:
    """A tiny random checkpoint of `model_type` with its processor and chat template, as a hub one is laid out."""
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        from strata.backbone.families.qwen2_vl import ImageOnlyQwen2VLProcessor
        from strata.backbone.families.qwen3_vl import ImageOnlyQwen3VLProcessor

        tok = tokenizer(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                         "<|video_pad|>"], {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                        eos_token="<|im_end|>")
        side, patch = 48 * 48, 16 if model_type == "qwen3_vl" else 8  # Qwen3-VL's tiny config has 16-pixel patches
        images = transformers.Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2,
                                                       size={"shortest_edge": side, "longest_edge": side})
        cls = ImageOnlyQwen3VLProcessor if model_type == "qwen3_vl" else ImageOnlyQwen2VLProcessor
        processor = cls(image_processor=images, tokenizer=tok, chat_template=QWEN_CHAT)
        config = CONFIGS[model_type]()
        ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
               "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
        for key, token in ids.items():
            setattr(config, key, tok.convert_tokens_to_ids(token))
    elif model_type == "llava_onevision":
        from strata.backbone.families.llava_onevision import ImageOnlyOneVisionProcessor

        tok = tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"], {"image_token": "<image>",
                        "video_token": "<video>"}, eos_token="<|im_end|>")
        tiles = [[48, 48], [48, 96], [96, 48], [96, 96]]  # a wide or tall image gets a second tile
        images = transformers.LlavaOnevisionImageProcessorPil(size={"height": 48, "width": 48}, image_grid_pinpoints=tiles)
        processor = ImageOnlyOneVisionProcessor(image_processor=images, tokenizer=tok, num_image_tokens=9,
                                                vision_feature_select_strategy="full", chat_template=ONEVISION_CHAT)
        config = CONFIGS["llava_onevision"]()
        config.image_grid_pinpoints, config.vision_feature_select_strategy = tiles, "full"
        config.image_token_index = tok.convert_tokens_to_ids("<image>")
    elif model_type == "internvl":
        from strata.backbone.families.internvl import ImageOnlyInternVLProcessor

        tok = tokenizer(["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                         "video_token": "<video>"}, eos_token="<|im_end|>")
        # Up to 4 tiles and a thumbnail: a wide image gets more tiles than a square one.
        images = transformers.GotOcr2ImageProcessorPil(size={"height": 48, "width": 48}, crop_to_patches=True,
                                                       min_patches=1, max_patches=4)
        processor = ImageOnlyInternVLProcessor(image_processor=images, tokenizer=tok, image_seq_length=9,
                                               chat_template=INTERNVL_CHAT)
        config = CONFIGS["internvl"]()
        config.image_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    elif model_type in ("idefics3", "smolvlm"):
        from strata.backbone.families.idefics3 import ImageOnlySmolVLMProcessor

        tok = tokenizer(["<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                         "<global-img>"], {"image_token": "<image>"}, eos_token="<end_of_utterance>",
                        bos_token="<|im_start|>")
        size = {"size": {"longest_edge": 48}, "do_image_splitting": False, "max_image_size": {"longest_edge": 48}}
        if model_type == "smolvlm":
            images = transformers.SmolVLMImageProcessorPil(**size)
            processor = ImageOnlySmolVLMProcessor(image_processor=images, tokenizer=tok, image_seq_len=9,
                                                  chat_template=IDEFICS3_CHAT)
        else:
            images = transformers.Idefics3ImageProcessorPil(**size)
            processor = transformers.Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=9,
                                                       chat_template=IDEFICS3_CHAT)
        config = CONFIGS[model_type]()
        config.image_token_id = tok.convert_tokens_to_ids("<image>")
    elif model_type == "gemma3":
        tok = tokenizer(["<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                         "<image_soft_token>"], {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"},
                        bos_token="<bos>", eos_token="<end_of_turn>")
        images = transformers.Gemma3ImageProcessorPil(size={"height": 48, "width": 48})
        processor = transformers.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=9,
                                                 chat_template=GEMMA3_CHAT)
        config = CONFIGS["gemma3"]()
        ids = {"image_token_index": "<image_soft_token>", "boi_token_index": "<start_of_image>",
               "eoi_token_index": "<end_of_image>"}
        for key, token in ids.items():
            setattr(config, key, tok.convert_tokens_to_ids(token))
    else:
        raise ValueError(f"no checkpoint recipe for {model_type!r}")
    text = config.text_config
    text.vocab_size, text.pad_token_id, text.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
    text.bos_token_id = tok.bos_token_id
    config.tie_word_embeddings = True
    torch.manual_seed(0)  # the same tiny model on every run, so what tests assert of its training is repeatable
    model = transformers.AutoModelForImageTextToText.from_config(config)
    if model_type == "gemma3":  # initialised to zeros, which would cut the vision side off the loss
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    model.save_pretrained(path)
    processor.save_pretrained(path)
