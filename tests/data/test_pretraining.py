"""The built-in backbone's pretraining mixture: deterministic, and it teaches every answer word."""

from __future__ import annotations

import io
import random
import re

from PIL import Image, ImageOps

from strata.backbone.tiny import TinyRecipe, build_processor, tokenizer_text
from strata.backbone.tiny_families import LLAVA
from strata.data import pretraining
from strata.data.benchmark import TASKS, generate_task
from strata.data.scenes import Obj, Scene, near_misses


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_the_corpus_is_deterministic_and_has_every_kind_of_row() -> None:
    rows = pretraining.corpus(seed=0, n=300, image_size=48)
    assert rows == pretraining.corpus(seed=0, n=300, image_size=48)
    assert rows[:50] == pretraining.corpus(seed=0, n=50, image_size=48)  # a prefix does not depend on n
    assert all(Image.open(io.BytesIO(png)).size == (48, 48) for png, _, _ in rows)
    answers = [a for _, _, a in rows]
    assert any(a.startswith("yes, ") for a in answers) and any(a.startswith("no, ") for a in answers)
    assert any(a.startswith("it says ") for a in answers) and any(" objects: " in a for a in answers)
    assert any(" larger than " in a for a in answers) and any(" smaller than " in a for a in answers)


def test_pretraining_makes_the_model_say_every_answer_word_of_the_built_in_stream() -> None:
    """A frozen, tied LM head can only say words pretraining taught it to say (pretraining.py)."""
    said = set().union(*(words(a) for _, _, a in pretraining.corpus(seed=0, n=3000, image_size=48)))
    for task in TASKS:
        answers = {a for a in generate_task(task, seed=0, n_train=40, n_val=0, n_test=0)["answer"].to_pylist()}
        missing = set().union(*(words(a) for a in answers)) - said
        assert not missing, f"{task}: pretraining never answers with {sorted(missing)}"


def test_the_tokenizer_keeps_english_words_whole_and_the_images_any_size() -> None:
    rows = pretraining.corpus(seed=0, n=400, image_size=48)
    processor = build_processor(TinyRecipe(), tokenizer_text(rows, LLAVA))
    tok = processor.tokenizer
    split = [w for w in pretraining.english_words() if len(tok(" " + w, add_special_tokens=False)["input_ids"]) > 1]
    assert not split, f"split into pieces: {split[:20]}"
    assert tok.convert_ids_to_tokens(tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]) == ["ĠASSISTANT", ":"]
    for size in ((100, 37), (20, 64), (48, 48)):
        pixels = processor.image_processor(Image.new("RGB", size), return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 48, 48), size


def test_a_rendered_word_stays_inside_the_image() -> None:
    rng = random.Random(0)
    for word in ("a", "rectangle", "mountain", "zero"):
        image = pretraining.render_word(word, rng, 48)
        ink = ImageOps.invert(image.convert("L")).point(lambda v: 255 if v > 110 else 0)
        box = ink.getbbox()
        assert box is not None, word
        left, top, right, bottom = box
        assert left > 0 and top > 0 and right < 48 and bottom < 48, (word, box)


def test_the_vision_stage_labels_name_what_is_drawn_in_each_cell() -> None:
    scene = Scene((Obj("red", "circle", "small", 0, 0), Obj("orange", "diamond", "large", 2, 1)))
    labels = pretraining.cell_labels(scene)
    assert labels[0] == [1, 1, 1] and labels[7] == [6, 4, 2]
    assert all(ids == [0, 0, 0] for cell, ids in enumerate(labels) if cell not in (0, 7))
    image, labels = pretraining.labelled_scene(random.Random(0), 48)
    assert image.size == (48, 48) and len(labels) == 9


def test_a_glyph_is_one_character_of_many_sizes_and_its_label() -> None:
    rng = random.Random(1)
    heights = set()
    for _ in range(40):
        image, index = pretraining.labelled_glyph(rng, 48)
        assert 0 <= index < len(pretraining.GLYPHS) and image.size == (48, 48)
        ink = ImageOps.invert(image.convert("L")).point(lambda v: 255 if v > 110 else 0).getbbox()
        assert ink is not None
        heights.add(ink[3] - ink[1])
    assert max(heights) >= 2 * min(heights)  # sizes vary, so the tower cannot key on one font size


def test_a_near_miss_shares_one_attribute_with_a_drawn_object_and_is_not_drawn() -> None:
    scene = Scene((Obj("red", "circle", "small", 0, 0), Obj("blue", "square", "large", 1, 1)))
    near = near_misses(scene)
    assert ("red", "square") in near and ("blue", "circle") in near and ("red", "triangle") in near
    assert ("red", "circle") not in near and ("blue", "square") not in near
    assert all(c in ("red", "blue") or s in ("circle", "square") for c, s in near)
    assert ("green", "triangle") not in near


def test_the_binding_stage_asks_about_one_object_among_several() -> None:
    rows = pretraining.draw_rows(random.Random(3), pretraining.BINDING, 400, 48)
    assert rows == pretraining.draw_rows(random.Random(3), pretraining.BINDING, 400, 48)
    prompts = [p for _, p, _ in rows]
    for start in ("Where is the ", "What colour is the ", "What shape is the ", "Can you see a "):
        assert any(p.startswith(start) for p in prompts), start
    # The answer is about the object the question names.
    for _, prompt, answer in rows:
        if prompt.startswith("What colour is the "):
            shape = prompt.removeprefix("What colour is the ").removesuffix("?")
            assert answer.startswith(f"the {shape} is ")
