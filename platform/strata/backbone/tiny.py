"""The built-in backbone recipes: a tiny LLaVA (CLIP tower, projector, Llama LM) or a tiny Qwen2-VL,
made in-process (strata.backbone.tiny_families says what differs between the two).

No weights can be downloaded, so Strata ships a recipe: a BPE tokenizer (common English words
whole) and an image processor built here, a model from config, and a few CPU minutes of
pretraining on procedurally drawn data (strata/data/pretraining.py) in three stages: the vision
tower alone on dense labels; the whole model on captions, questions and rendered words; then the
whole model on questions that name one object among several. The result is cached under the
user's cache dir, keyed by the recipe's hash.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, ProcessorMixin

from strata.backbone.tiny_families import TINY_FAMILIES, TinyFamily
from strata.data import pretraining
from strata.data.collate import collate, encode_table
from strata.data.template import render_answer, render_prompt

RECIPE_VERSION = "8"  # bump when the code below changes what a recipe produces


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the built-in backbone's weights."""

    family: str = "llava"  # a key of strata.backbone.tiny_families.TINY_FAMILIES
    width: int = 128
    vision_layers: int = 3
    text_layers: int = 4
    heads: int = 4
    image_size: int = 48
    # One patch per cell of the scenes' 3x3 grid, so one image token holds one object's colour,
    # shape and size together, and "the red circle" is one token for the LM to find.
    patch_size: int = 16
    vocab_size: int = 3000  # enough for the common English words to stay whole
    corpus_size: int = 12000  # pretraining rows (drawn once, reused across epochs)
    vision_steps: int = 1500  # the vision stage: about 2 of the build's 16 CPU minutes on 2 cores
    vision_batch_size: int = 64  # its images are drawn fresh every step
    steps: int = 3000  # the whole-model stage on the mixture corpus
    binding_steps: int = 3000  # the binding stage, on rows drawn fresh every step
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all three stages, for progress."""
        return self.vision_steps + self.steps + self.binding_steps

    def key(self) -> str:
        """Cache key: hash of the recipe fields and the recipe code version."""
        fields = dataclasses.asdict(self)
        if fields["family"] == "llava":
            del fields["family"]  # the LLaVA recipes predate the field: their builds keep their keys
        blob = json.dumps({"v": RECIPE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_TEST = {"width": 64, "vision_layers": 2, "text_layers": 2, "corpus_size": 2000, "vision_steps": 150,
         "vision_batch_size": 32, "steps": 500, "binding_steps": 200}
RECIPES = {
    "builtin:tiny": TinyRecipe(),
    # Small enough that a test session pretrains it in under a minute.
    "builtin:test": TinyRecipe(**_TEST),
    # Qwen2-VL: 8-pixel patches, merged 2x2, so each LM image token again covers one grid cell.
    "builtin:tiny-qwen2vl": TinyRecipe(family="qwen2_vl", patch_size=8),
    "builtin:test-qwen2vl": TinyRecipe(family="qwen2_vl", patch_size=8, **_TEST),
}


def cache_root() -> Path:
    """Where built backbones live: $STRATA_CACHE, else $XDG_CACHE_HOME/strata, else ~/.cache/strata."""
    if os.environ.get("STRATA_CACHE"):
        return Path(os.environ["STRATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "strata"


def tokenizer_text(rows: list[pretraining.Row], family: TinyFamily) -> list[str]:
    """The tokenizer's training text: English words and the pretraining rows, in the family's chat
    template, so its words and markers become whole tokens. Nothing of the built-in stream: changing a
    task's wording must not change the backbone."""
    chat = family.chat
    return [render_prompt(chat, t, has_image=True) + render_answer(chat, t, t) for t in pretraining.tokenizer_text(rows)]


def build_processor(recipe: TinyRecipe, texts: list[str]) -> ProcessorMixin:
    """Train a byte-level BPE on `texts` and pair it with the family's processor for any image size."""
    family = TINY_FAMILIES[recipe.family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=family.specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return family.processor(recipe, PreTrainedTokenizerFast(tokenizer_object=tok, **family.named_tokens))


def build_model(recipe: TinyRecipe, processor: ProcessorMixin) -> torch.nn.Module:
    """A randomly initialised tiny model of the recipe's family, its shapes from the recipe."""
    model = TINY_FAMILIES[recipe.family].model(recipe, processor)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )


def _update(loss: torch.Tensor, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LambdaLR, ema: float | None) -> float:
    """One optimizer step on `loss`, gradients clipped at norm 1; returns the smoothed loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()


def pretrain_vision(
    model: torch.nn.Module,
    processor: ProcessorMixin,
    recipe: TinyRecipe,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """The vision stage: train the tower alone, through throwaway linear heads, to name every grid
    cell's colour, shape and size from its pooled patch tokens (the tokens the LM later reads);
    returns the final smoothed loss."""
    family, w = TINY_FAMILIES[recipe.family], recipe.width
    tower = family.vision(model)
    cell_heads = torch.nn.ModuleList(torch.nn.Linear(w, len(v) + 1) for v in pretraining.CELL_LABELS.values())
    params = [*tower.parameters(), *cell_heads.parameters()]
    opt = torch.optim.AdamW(params, lr=2 * recipe.lr, weight_decay=0.01)
    sched = _cosine(opt, recipe.vision_steps)
    rng = random.Random(f"vision:{recipe.seed}")
    ce = torch.nn.functional.cross_entropy
    tower.train()
    ema = None
    for step in range(recipe.vision_steps):
        scenes = [pretraining.labelled_scene(rng, recipe.image_size) for _ in range(recipe.vision_batch_size)]
        grid_tokens = family.grid_tokens(model, processor, [img for img, _ in scenes]).permute(0, 3, 1, 2)
        cells = torch.nn.functional.adaptive_avg_pool2d(grid_tokens, 3).flatten(2).transpose(1, 2)
        labels = torch.tensor([lab for _, lab in scenes])  # (images, 9 cells, attributes)
        loss = sum(ce(head(cells).flatten(0, 1), labels[..., k].flatten()) for k, head in enumerate(cell_heads))
        ema = _update(loss, params, opt, sched, ema)
        if progress is not None:
            progress(step + 1, ema)
    return float(ema)


def pretrain(
    model: torch.nn.Module,
    recipe: TinyRecipe,
    batches: Callable[[], dict[str, torch.Tensor]],
    steps: int,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """A whole-model stage: full-parameter training for `steps` steps, each on `batches()`; returns the
    final smoothed loss."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    sched = _cosine(opt, steps)
    model.train()
    ema = None
    for step in range(steps):
        ema = _update(model(**batches()).loss, params, opt, sched, ema)
        if progress is not None:
            progress(step + 1, ema)
    model.eval()
    return float(ema)


def _encode(processor: ProcessorMixin, rows: list[pretraining.Row]) -> pa.Table:
    table = pa.table({"image": [r[0] for r in rows], "prompt": [r[1] for r in rows], "answer": [r[2] for r in rows]})
    return encode_table(processor, table, with_answers=True)


def corpus_batches(processor: ProcessorMixin, recipe: TinyRecipe,
                   corpus: list[pretraining.Row]) -> Callable[[], dict[str, torch.Tensor]]:
    """Batches sampled from the fixed mixture corpus (encoded once)."""
    enc, rng, pad = _encode(processor, corpus), random.Random(recipe.seed), processor.tokenizer.pad_token_id
    return lambda: collate(enc.select(rng.sample(range(len(enc)), recipe.batch_size)), pad)


def binding_batches(processor: ProcessorMixin, recipe: TinyRecipe) -> Callable[[], dict[str, torch.Tensor]]:
    """Batches of the binding stage, drawn fresh every step so that no scene is seen twice."""
    rng, pad = random.Random(f"binding:{recipe.seed}"), processor.tokenizer.pad_token_id
    draw = pretraining.draw_rows
    return lambda: collate(_encode(processor, draw(rng, pretraining.BINDING, recipe.batch_size, recipe.image_size)), pad)


def ensure_builtin(name: str, progress: Callable[[int, float], None] | None = None) -> Path:
    """Return the cached directory of a built-in backbone, building and pretraining it if absent."""
    recipe = RECIPES[name]
    final = cache_root() / "backbones" / f"{name.split(':')[1]}-{recipe.key()}"
    if (final / "strata_recipe.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One build per machine: a second process (a parallel test worker, another job) waits for it.
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "strata_recipe.json").exists():
            return final
        return build(recipe, final, progress)


def build(recipe: TinyRecipe, final: Path, progress: Callable[[int, float], None] | None = None) -> Path:
    """Build, pretrain and save a recipe's backbone into `final` (atomically); returns `final`."""
    started = time.time()
    corpus = pretraining.corpus(recipe.seed, recipe.corpus_size, recipe.image_size)
    processor = build_processor(recipe, tokenizer_text(corpus, TINY_FAMILIES[recipe.family]))
    model = build_model(recipe, processor)
    vision_loss = pretrain_vision(model, processor, recipe, progress)
    mixture_loss = pretrain(model, recipe, corpus_batches(processor, recipe, corpus), recipe.steps,
                            _after(progress, recipe.vision_steps))
    loss = pretrain(model, recipe, binding_batches(processor, recipe), recipe.binding_steps,
                    _after(progress, recipe.vision_steps + recipe.steps))

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        meta = {"recipe": dataclasses.asdict(recipe), "key": recipe.key(), "final_loss": loss,
                "vision_stage_loss": vision_loss, "mixture_stage_loss": mixture_loss,
                "seconds": round(time.time() - started, 1)}
        # Written last: a directory without it is an unfinished build and is never used.
        (tmp / "strata_recipe.json").write_text(json.dumps(meta, indent=2))

    return _install(save, final)


def _after(progress: Callable[[int, float], None] | None, done: int) -> Callable[[int, float], None] | None:
    """`progress` for a later stage: its steps counted after the `done` steps of the earlier ones."""
    return None if progress is None else lambda step, ema: progress(done + step, ema)


def _install(fill: Callable[[Path], object], final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        fill(tmp)
        if final.exists() and not (final / "strata_recipe.json").exists():
            shutil.rmtree(final)  # an unfinished build left by a killed process
        os.replace(tmp, final)
    except OSError:
        if not (final / "strata_recipe.json").exists():
            raise
        # Another machine sharing the cache finished the same build first; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
