"""The OpenAI chat-completions wire format: parse and check a request, shape a reply, name an error.

Pure functions, no Ray and no HTTP framework, so every refusal is unit-tested. A conversation is
folded into one prompt with the shared chat template (`data/template.py`), as training saw it.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.request
import uuid
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
    allow_http_images: bool = False


def parse_chat(body: dict, limits: Limits) -> tuple[Request, bool]:
    """A chat-completions body as a host Request, and whether the reply should stream."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` must be a serving id: <stream>/<adapter>[@v<N>], <adapter> or <stream>/auto",
                       param="model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"`max_tokens` must be an integer in [1, {limits.max_tokens}]", param="max_tokens")
    temperature = body.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ApiError(400, "`temperature` must be a number in [0, 2]", param="temperature")
    history, prompt, image = conversation(body.get("messages"), limits)
    return Request(model, prompt, image, max_tokens, float(temperature), tuple(history)), bool(body.get("stream", False))


def conversation(messages, limits: Limits) -> tuple[list[tuple[str, str]], str, bytes]:
    """The earlier (question, answer) turns, the last question (system text before it) and the one image."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    system, turns, images = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must have role system, user or assistant", param=f"messages[{i}]")
        text = content_text(m.get("content"), i, images, limits)
        if m["role"] == "system":
            system.append(text)
        else:
            turns.append((m["role"], text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    if len(images) != 1:
        raise ApiError(400, f"this backbone answers about exactly one image per conversation; got {len(images)}",
                       param="messages")
    history, pending = [], None
    for role, text in turns[:-1]:
        if role == "user":
            pending = text
        elif pending is not None:
            history.append((pending, text))
            pending = None
    question = " ".join([*system, turns[-1][1]])
    return history, question, images[0]


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
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
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
                         "finish_reason": c.finish_reason}],
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                      "total_tokens": c.prompt_tokens + len(c.tokens)}}
    if c.route is not None:
        body["strata"] = {"route": route_info(c.route)}
    return body


def route_info(route: Routed) -> dict:
    """The routed task, its relative distance (about 1 for a typical row of it) and the low-confidence flag."""
    return {"task": route.task, "distance": route.distance, "low_confidence": route.low_confidence}


def stream_chunks(c: Completion, pieces: list[str]) -> list[dict]:
    """chat.completion.chunk events for an answer already generated: role, one per piece, then the finish."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": c.model}
    first = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    middle = [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    last = [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": c.finish_reason}],
             **({"strata": {"route": route_info(c.route)}} if c.route is not None else {})}]
    return first + middle + last
