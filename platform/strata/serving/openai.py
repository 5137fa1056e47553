"""The OpenAI chat-completions and completions wire format: parse and check a request, shape a reply
or its stream of events, name an error.

No Ray and no HTTP framework, so every refusal is unit-tested. A conversation becomes earlier turns,
a question and its images, rendered later with the backbone's chat template (`data/template.py`)
as training saw it; a plain completion's prompt is tokenized as it is.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.request
import uuid
import warnings
from dataclasses import dataclass

from PIL import Image

from strata.data.schema import IMAGE_FORMATS, image_problem
from strata.routing import Routed
from strata.serving.host import Completion, Request


class ApiError(Exception):
    """A request the API refuses: the HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def __reduce__(self):  # raised in a replica, it crosses to the ingress pickled
        return ApiError, (self.status, self.message, self.kind, self.param)

    def body(self) -> dict:
        """The JSON error body the OpenAI client understands."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_tokens: int = 256
    max_images: int = 8
    allow_http_images: bool = False


@dataclass(frozen=True)
class Streaming:
    """How a streamed reply is shaped: `stream_options.include_usage` adds a last chunk with the usage."""

    include_usage: bool = False


# Fields the API takes but cannot honour: refused, so that nobody relies on a setting that does nothing.
UNSUPPORTED = {
    "stop": "stop sequences are not supported; an answer ends at the end of sequence or at max_tokens",
    "logprobs": "logprobs are not returned by this server",
    "tools": "tool calls are not supported", "functions": "function calls are not supported",
    "logit_bias": "logit_bias is not supported",
}


def parse_sampling(body: dict, limits: Limits) -> dict:
    """The sampling fields every endpoint shares, checked: Request keyword arguments."""
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False, [], ""):
            raise ApiError(400, f"`{key}`: {why}", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key, 0) != 0:
            raise ApiError(400, f"`{key}` is not supported; leave it at 0", param=key)
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"`max_tokens` must be an integer in [1, {limits.max_tokens}]", param="max_tokens")
    temperature = body.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ApiError(400, "`temperature` must be a number in [0, 2]", param="temperature")
    top_p = body.get("top_p", 1.0)
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ApiError(400, "`top_p` must be a number in (0, 1]", param="top_p")
    if body.get("seed") is not None and temperature > 0:
        raise ApiError(400, "`seed` is not supported with temperature > 0: sampled requests share a batch, so a "
                            "seed cannot make one reproducible (temperature 0 is deterministic)", param="seed")
    if not isinstance(body.get("ignore_eos", False), bool):
        raise ApiError(400, "`ignore_eos` must be true or false", param="ignore_eos")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
            "ignore_eos": body.get("ignore_eos", False)}


def parse_stream(body: dict) -> Streaming | None:
    """None for a plain reply; how to stream otherwise."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    if not body.get("stream", False):
        if options:
            raise ApiError(400, "`stream_options` needs `stream: true`", param="stream_options")
        return None
    return Streaming(include_usage=bool((options or {}).get("include_usage", False)))


def parse_model(body: dict) -> str:
    """The serving id a body names."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` must be a serving id: <stream>/<adapter>[@v<N>], <adapter> or <stream>/auto",
                       param="model")
    return model


def parse_chat(body: dict, limits: Limits) -> tuple[Request, Streaming | None]:
    """A chat-completions body as a host Request, and how to stream the reply (None: not streamed)."""
    model = parse_model(body)
    sampling = parse_sampling(body, limits)
    history, prompt, images, image_turns = conversation(body.get("messages"), limits)
    return (Request(model, prompt, tuple(images), history=tuple(history), image_turns=image_turns, **sampling),
            parse_stream(body))


def parse_completion(body: dict, limits: Limits) -> tuple[Request, Streaming | None]:
    """A completions body (a plain prompt, no chat template) as a host Request, and how to stream it."""
    model = parse_model(body)
    sampling = parse_sampling(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "`prompt` must be a non-empty string (one prompt per request)", param="prompt")
    if body.get("echo") or body.get("suffix") or body.get("best_of", 1) != 1:
        raise ApiError(400, "`echo`, `suffix` and `best_of` are not supported", param="prompt")
    return Request(model, prompt, raw=True, **sampling), parse_stream(body)


def conversation(messages, limits: Limits) -> tuple[list[tuple[str, str]], str, list[bytes], tuple[int, ...]]:
    """The earlier (question, answer) turns, the last question (system text before it), the images, and
    how many images each user turn carried."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    system, turns, images = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must have role system, user or assistant", param=f"messages[{i}]")
        before = len(images)
        text = content_text(m.get("content"), i, images, limits)
        if m["role"] != "user" and len(images) > before:
            raise ApiError(400, f"messages[{i}]: only user messages may carry images", param=f"messages[{i}]")
        if m["role"] == "system":
            system.append(text)
        else:
            turns.append((m["role"], text, len(images) - before))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    if len(images) > limits.max_images:
        raise ApiError(400, f"{len(images)} images; this server takes at most {limits.max_images} per request",
                       param="messages")
    history, counts, pending = [], [], None
    for role, text, count in turns[:-1]:
        if role == "user":  # consecutive user messages fold into one turn
            pending = text if pending is None else f"{pending} {text}"
            counts.append(count) if len(counts) == len(history) else counts.__setitem__(-1, counts[-1] + count)
        elif pending is not None:
            history.append((pending, text))
            pending = None
    if pending is not None:  # a user turn with no answer before the last one: it joins the question
        question_head, head_images = [pending], counts.pop()
    else:
        question_head, head_images = [], 0
    counts.append(head_images + turns[-1][2])
    question = " ".join([*system, *question_head, turns[-1][1]])
    return history, question, images, tuple(counts)


def content_text(content, i: int, images: list[bytes], limits: Limits) -> str:
    """The text of one message's content (a string or parts); images are decoded into `images`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}]")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
            images.append(fetch_image(url, f"messages[{i}].content[{j}]", limits))
        else:
            raise ApiError(400, f"messages[{i}].content[{j}] must be a text or image_url part", param=f"messages[{i}]")
    return " ".join(texts)


def fetch_image(url, where: str, limits: Limits) -> bytes:
    """The image bytes of a data URL (or, when allowed, an http(s) URL), checked like a dataset image."""
    if not isinstance(url, str):
        raise ApiError(400, f"{where}: image_url.url must be a string", param=where)
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(400, f"{where}: only base64 data URLs are supported", param=where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, f"{where}: image is over the limit of {limits.max_image_bytes} bytes", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: the data URL is not valid base64 ({e})", param=where) from e
    elif url.startswith(("http://", "https://")) and limits.allow_http_images:
        with urllib.request.urlopen(url, timeout=5) as reply:
            data = reply.read(limits.max_image_bytes + 1)
    elif url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: http image URLs are disabled on this server; send a data URL", param=where)
    else:
        raise ApiError(400, f"{where}: image_url.url must be a data: URL", param=where)
    check_image(data, where, limits)
    return data


def check_image(data: bytes, where: str, limits: Limits) -> None:
    """413 for an image over the byte or pixel limit (read from the header), 400 for one that does not decode."""
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{where}: image is {len(data)} bytes, over the limit of {limits.max_image_bytes}",
                       param=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses to open it at all: it is over PIL's own pixel limit, so over ours too.
        raise ApiError(413, f"{where}: image is over the pixel limit of {limits.max_pixels} ({e})", param=where) from e
    except Exception as e:
        raise ApiError(400, f"{where}: cannot decode the image as {' or '.join(IMAGE_FORMATS)}", param=where) from e
    if width * height > limits.max_pixels:
        raise ApiError(413, f"{where}: image is {width}x{height} pixels, over the limit of {limits.max_pixels}",
                       param=where)
    problem = image_problem(data, limits.max_image_bytes, limits.max_pixels)
    if problem:
        raise ApiError(400, f"{where}: {problem}", param=where)


def completion_body(c: Completion) -> dict:
    """A chat.completion reply; an `auto` request's also says where the router sent it (`strata.route`)."""
    body = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": c.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason}], "usage": usage(c)}
    if c.route is not None:
        body["strata"] = {"route": route_info(c.route)}
    return body


def route_info(route: Routed) -> dict:
    """The routed task, its relative distance (about 1 for a typical row of it) and the low-confidence flag."""
    return {"task": route.task, "distance": route.distance, "low_confidence": route.low_confidence}


class Chunks:
    """The server-sent events of one streamed reply, chat (`chat.completion.chunk`) or plain (`text_completion`)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish}

    def start(self) -> dict:
        """The first event: the assistant's role (chat), before any token."""
        return {**self.base, "choices": [self._choice("", None, role=True)]}

    def text(self, delta: str) -> dict:
        """An event with newly decoded text."""
        return {**self.base, "choices": [self._choice(delta, None)]}

    def finish(self, c: Completion) -> dict:
        """The last choice event: why the answer ended (and, for `auto`, where it was routed)."""
        return {**self.base, "model": c.model, "choices": [self._choice(None, c.finish_reason)],
                **({"strata": {"route": route_info(c.route)}} if c.route is not None else {})}

    def usage(self, c: Completion) -> dict:
        """`stream_options.include_usage`: one more event, with no choices and the token counts."""
        return {**self.base, "model": c.model, "choices": [], "usage": usage(c)}


def usage(c: Completion) -> dict:
    """The token counts of a reply."""
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
            "total_tokens": c.prompt_tokens + len(c.tokens)}


def text_completion_body(c: Completion) -> dict:
    """A text_completion reply (`/v1/completions`)."""
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": c.model, "choices": [{"index": 0, "text": c.text, "logprobs": None,
                                           "finish_reason": c.finish_reason}], "usage": usage(c)}
