"""The chat templates that each family's published checkpoint ships, byte for byte.

tests/family_models.py gives its tiny checkpoints short hand-written templates; these are the real ones,
for tests that check Strata's rendering against what the families publish
(tests/backbone/test_reference_renderings.py). Nothing here is rewritten: a template that also handles
tools, videos or a system turn keeps that code.

Each template is the string literal of the published JSON file's value (chat_template.json,
tokenizer_config.json or processor_config.json), copied as written: JSON and Python spell the escapes used
there alike (newline, quote, backslash), so the Python string is the template the Hub serves. Qwen3-VL's,
long and multi-line, is a raw string of the decoded template instead. Where the checkpoint ships a
chat_template.jinja, the literal holds that file's text. The Hub files were read through public mirrors
and repositories; each comment names the published file and where its text was read. PUBLISHED_SIZES and
QWEN3_VL_SHA256 pin the sizes and the hash of the published files, and the reference test checks them.
"""

from __future__ import annotations

# llava-hf/llava-1.5-7b-hf, chat_template.json (701 bytes on the Hub). Text read from
# huggingface/transformers tests/models/llava/test_processing_llava.py (prepare_processor_dict; its tiny
# processor is made from llava-hf/llava-1.5-7b-hf) and from the Hub duplicate
# FriendliAI/llava-1.5-7b-hf/chat_template.json ("Duplicate from llava-hf/llava-1.5-7b-hf").
LLAVA_1_5 = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf, chat_template.json ("Update chat_template.json", 826 bytes on
# the Hub). Text read from huggingface/transformers
# tests/models/llava_onevision/test_processing_llava_onevision.py (prepare_processor_dict); vLLM's
# processor test for this checkpoint prompts "<|im_start|>user <image>\n...<|im_end|><|im_start|>assistant\n",
# which is what it renders.
LLAVA_ONEVISION = "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Qwen/Qwen2-VL-7B-Instruct, chat_template.json at db8ce505bd3d523ac372f552648175c684c6f3f7 ("Update
# chat_template.json to incorporate `generation` tag", 1.28 kB), read from the Hub's own page
# huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/db8ce505bd3d523ac372f552648175c684c6f3f7/chat_template.json.
QWEN2_VL = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}{% else %}{{ content['text'] }}{% endif %}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

# Qwen/Qwen2.5-VL-7B-Instruct (and -3B-Instruct), chat_template.json (1.05 kB on the Hub: Qwen2-VL's
# first template, without generation tags). Text read from the Hub mirror
# optimum-intel-internal-testing/tiny-random-qwen2.5-vl/chat_template.json and public copies marked as the
# official Qwen2.5-VL template.
QWEN2_5_VL = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

# Qwen/Qwen3-VL-8B-Instruct, chat_template.json (5292 bytes once decoded; the Hub copy of
# Qwen/Qwen3-VL-4B-Instruct's file begins the same). Text read from github.com/zhongkaifu/TensorSharp
# (InferenceWeb.Tests QwenImageIntentScorerTests: the template of Qwen/Qwen3-VL-8B-Instruct-GGUF, pinned
# there by size and SHA-256) and checked against an NVIDIA dataset module that copies it "byte-identical
# to the chat templates shipped with ... Qwen/Qwen3-VL-8B-Instruct". Tools and videos kept as published.
QWEN3_VL = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN3_VL_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"  # as TensorSharp pins it

# HuggingFaceM4/Idefics3-8B-Llama3, chat_template.json (434 bytes) and processor_config.json ("Create
# processor_config.json", c6bf80e), read from the Hub page
# huggingface.co/HuggingFaceM4/Idefics3-8B-Llama3/blob/92a708af3b96e7fe9aeac5d439a1f64083868a05/processor_config.json.
# transformers' tests/models/idefics3/test_processing_idefics3.py renders this checkpoint's template as
# "<|begin_of_text|>User: ...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n...Assistant:".
IDEFICS3 = "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"

# HuggingFaceTB/SmolVLM-Instruct, chat_template.json at 91959f09ef43e11129cced282c37b5bebc85fb2c ("Update
# chat_template.json", 748d43f, 429 bytes), read from the Hub page
# huggingface.co/HuggingFaceTB/SmolVLM-Instruct/blob/91959f09ef43e11129cced282c37b5bebc85fb2c/chat_template.json.
SMOLVLM = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"

# google/gemma-3-4b-it, tokenizer_config.json / chat_template.json: the Gemma 3 instruction-tuned template
# (with the system turn given as a string or as parts). Text read from the chat_template that the Hub API
# reports for ggml-org/gemma-3-1b-it-GGUF and ggml-org/gemma-3-12b-it-GGUF (converted from Google's
# checkpoints) and from the Hub copy DimensionSTP/gemma-3-4b-it-Ko-Reasoning/chat_template.json. The Jinja
# string literals ('\n', '\n\n') hold real newlines, as most copies show them; a copy that writes them as
# backslash-n escapes would render the same. No published size was found to pin this one.
GEMMA3 = "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"

# OpenGVLab/InternVL3-1B-hf, chat_template.jinja ("Update processor (#2)", 481 bytes on the Hub). Text read
# from the template that huggingface/transformers
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py writes into the -hf checkpoints, in
# the version whose image placeholder is <IMG_CONTEXT> (the one that is 481 bytes; an older revision of the
# script wrote <image>).
INTERNVL = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"

# The published template of each family Strata supports (keys: strata.backbone.families names).
PUBLISHED = {
    "llava": LLAVA_1_5,
    "llava_onevision": LLAVA_ONEVISION,
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen3_vl": QWEN3_VL,
    "idefics3": IDEFICS3,
    "smolvlm": SMOLVLM,
    "gemma3": GEMMA3,
    "internvl": INTERNVL,
}

# Sizes the Hub lists for the published files, in bytes: a chat_template.json is the template in
# `{"chat_template": ...}` written by json.dumps(indent=2), with or without a final newline
# ("newline"); a chat_template.jinja is the template itself.
PUBLISHED_SIZES = {
    "llava": ("json", 701, True),
    "llava_onevision": ("json", 826, True),
    "idefics3": ("json", 434, False),
    "smolvlm": ("json", 429, False),
    "internvl": ("jinja", 481, False),
}
