"""Load a frozen LLaVA-style backbone and its processor from a spec (full precision, 4-bit or 8-bit)."""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from strata.backbone.families import Family, family_of
from strata.backbone.inspect import read_config
from strata.backbone.tiny import ensure_builtin
from strata.config import BackboneSpec

# QLoRA quantizes the LM's linear layers, which hold nearly all the weights, and keeps the rest in full
# precision (each family's `quantization_skip`):
# - lm_head: the output projection over the vocabulary; transformers never quantizes it by default,
#   and naming any skip list replaces that default, so it is listed.
# - the projector: the bridge between the towers, whose error every image token carries into the LM
#   (LLaVA's own QLoRA recipe keeps its mm_projector unquantized).
# - the vision tower: a few percent of the weights, so 4 bits saves little memory there, and it
#   feeds the frozen pooled features the Decoupled router compares; visual adapters (LoRA on the
#   tower, BitFit on its biases) then wrap plain nn.Linear layers.
QUANTIZED_DEVICES = ("cpu", "cuda")  # the bitsandbytes backends Strata builds on (ENVIRONMENT.md)


def resolve(spec: BackboneSpec, progress: Callable[[int, float], None] | None = None) -> Path:
    """The local directory holding the backbone (built-in ones are built and cached on demand)."""
    if spec.source.startswith("builtin:"):
        return ensure_builtin(spec.source, progress)
    return Path(spec.source)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every parameter explicitly, projector and bridges included."""
    model.requires_grad_(False)
    model.eval()
    return model


def _device(device: torch.device | str | None) -> torch.device:
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None:  # the exact device, so later .device checks match
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_backbone(spec: BackboneSpec, path: Path | None = None, device: torch.device | str | None = None):
    """Return (frozen model, processor). `path` skips resolving when the caller already has it.

    `device` defaults to the CPU. With `spec.quantization` ("4bit": NF4 with double quantization, or
    "8bit": LLM.int8) the LM's linear layers are bitsandbytes layers, placed on `device` at load time
    (move it later and bitsandbytes refuses, for 8-bit, or requantizes) and prepared for k-bit training; every parameter
    is still frozen, the adapter code adds the trainable ones.
    """
    path = Path(path or resolve(spec))
    device = _device(device)
    family = checkpoint_family(path)
    if spec.quantization is None:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        if device.type != "cpu":
            model.to(device)
    else:
        model = _load_quantized(path, spec.quantization, device, family)
    return freeze(model), load_processor(path, family)


def load_processor(path: Path, family: Family):
    """The backbone's processor, left-padding, with a chat template (its own, else its family's)."""
    processor = (family.load_processor or AutoProcessor.from_pretrained)(path)
    processor.tokenizer.padding_side = "left"
    if not processor.chat_template:
        if family.chat_template is None:
            raise ValueError(f"{path}: the processor has no chat template, and the {family.name} family has no "
                             "default; save the checkpoint's chat_template.jinja with it")
        processor.chat_template = family.chat_template
    return processor


def checkpoint_family(path: Path) -> Family:
    """The family of the checkpoint at `path` (an unsupported architecture is refused by name)."""
    return family_of(read_config(path))


@functools.lru_cache(maxsize=1)
def _loaded(spec: BackboneSpec, path: Path):
    return load_backbone(spec, path)


def shared_backbone(spec: BackboneSpec, path: Path):
    """(model, processor) over the weights this process loaded once, on the CPU.

    Every call returns a new module tree whose frozen parameters and buffers are the same tensors
    (deepcopy with those tensors in the memo): adapters attach to one copy alone, so a candidate
    and the state it would replace sit side by side for the price of one backbone in memory and
    one read from disk. The weights are frozen and never written, so sharing them is safe.
    """
    model, processor = _loaded(spec, Path(path))
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo), processor


def _load_quantized(path: Path, mode: str, device: torch.device, family: Family) -> torch.nn.Module:
    """A model whose LM linears are bitsandbytes 4-bit (NF4 + double quant) or 8-bit layers."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"backbone.quantization={mode!r} needs bitsandbytes, which is not installed: "
                          f"pip install bitsandbytes, or set backbone.quantization to None for a "
                          f"full-precision backbone") from e
    if device.type not in QUANTIZED_DEVICES:
        raise ValueError(f"backbone.quantization={mode!r} runs on {QUANTIZED_DEVICES}, not on {device}")
    config_file = path / "config.json"
    existing = json.loads(config_file.read_text()).get("quantization_config") if config_file.exists() else None
    if existing is not None:
        method = existing.get("quant_method", "unknown") if isinstance(existing, dict) else existing
        raise ValueError(f"{path} is already quantized ({method}), so it cannot be quantized again to "
                         f"{mode!r}; quantize the full-precision source model instead")

    if mode == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            # fp32 on CPU: the CPU backend dequantizes and multiplies in the input dtype; bf16 on CUDA.
            bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
            llm_int8_skip_modules=list(family.quantization_skip()),
        )
        layer_type = bnb.nn.Linear4bit
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(family.quantization_skip()))
        layer_type = bnb.nn.Linear8bitLt
        _quiet_int8_cast_warning()
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        quantization_config=config,
        device_map="cpu" if device.type == "cpu" else {"": device.index},
        dtype=torch.float32,  # what prepare_model_for_kbit_training casts the unquantized rest to anyway
    )
    quantized = [m for name, m in model.named_modules() if isinstance(m, layer_type) and not family.is_vision(name)]
    if not quantized:
        raise ValueError(f"{path}: quantization={mode!r} found no linear layer of the language model to "
                         f"quantize (kept in full precision: {family.quantization_skip()}); this model cannot be "
                         f"quantized by Strata, set quantization to None")
    # Casts any fp16/bf16 leftovers to fp32 and freezes. Gradient checkpointing stays off here: the
    # training loop turns it on (non-reentrant) when TrainConfig.gradient_checkpointing asks.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if device.type == "cpu":
        # On a CPU with AVX512-BF16, a Linear4bit's first eval forward without grad repacks its weight
        # in place into a bf16 inference layout. After that, training crashes in matmul_4bit ("a view of
        # a leaf Variable that requires grad is being used in an in-place operation"), and eval logits
        # come from a bf16 kernel instead of the fp32 path that training uses. Measured with
        # bitsandbytes 0.50.2; tests/backbone/test_quantized.py runs that eval-then-train sequence.
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    return model


class _Once(logging.Filter):
    """Lets the first record with a given message template through and drops its repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _quiet_int8_cast_warning() -> None:
    # bitsandbytes logs "inputs will be cast from torch.float32 to float16" on every 8-bit layer call
    # of every inference forward (dozens of lines per generated token); once is enough.
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in log.filters):
        log.addFilter(_Once("MatMul8bitLt: inputs will be cast"))


def backbone_hashes(path: Path) -> tuple[str, str]:
    """SHA-256 over the backbone's config files (chat template included) and over its weight files (cached
    while they are unchanged)."""
    files = sorted(f for f in Path(path).glob("*")  # the chat template decides the tokens, so it counts
                   if f.suffix in (".json", ".jinja", ".safetensors") and f.name != "strata_recipe.json")
    return _hashes(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _hashes(files: tuple[tuple[str, int, int], ...]) -> tuple[str, str]:
    config, weights = hashlib.sha256(), hashlib.sha256()
    for name, _, _ in files:
        f = Path(name)
        (weights if f.suffix == ".safetensors" else config).update(f.name.encode() + f.read_bytes())
    return config.hexdigest(), weights.hexdigest()


def fingerprint(path: Path) -> str:
    """A content hash of the backbone's config and weight files together, for lineage."""
    config, weights = backbone_hashes(path)
    return hashlib.sha256((config + weights).encode()).hexdigest()[:16]
