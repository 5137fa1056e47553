"""The built-in backbone's pretraining data: labelled images for the vision stage, a mixture of
captions, question-answer pairs and rendered words for the whole model, then binding questions.

The vision stage gives the tower direct, dense supervision (every grid cell's colour, shape and
size), so its frozen features carry what instruction tasks ask about; a
caption loss alone left shape and the dim colours undecodable after 3000 steps (docs/ARCHITECTURE.md,
"The built-in backbone").

The built-in backbone is frozen and its LM head shares the input embeddings, so a word that
pretraining never made the model say keeps its random embedding, and no adapter can then make the
model say it: that is why a yes/no adapter used to answer "yes" to every row (docs/ARCHITECTURE.md,
"The built-in backbone"). So pretraining makes the model produce every word an arriving task is
likely to answer with: yes and no, relation and size words, counts, colours and shapes, and the
common English words of `english_words.txt`, shown as rendered text. Its questions and answers are
phrased as sentences, unlike the instruction tasks' one-word answers, so the built-in stream is
not solved zero-shot; its features must still carry what those tasks ask about.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from functools import cache
from importlib import resources

from PIL import Image, ImageDraw, ImageFont

from strata.data.scenes import COLOURS, SHAPES, SIZES, Obj, Scene, draw, near_misses, png_bytes, random_scene
from strata.data.scenes import caption as scene_caption

DESCRIBE = "Describe the image."
Row = tuple[bytes, str, str]  # (PNG bytes, prompt, answer)


@cache
def english_words() -> tuple[str, ...]:
    """The common English words the tokenizer keeps whole and pretraining renders."""
    text = resources.files("strata.data").joinpath("english_words.txt").read_text()
    return tuple(w for line in text.splitlines() if not line.startswith("#") for w in line.split())


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`: left/right when their columns differ, else above/below."""
    if a.col != b.col:
        return "left" if a.col < b.col else "right"
    return "above" if a.row < b.row else "below"


def _relation_phrase(a: Obj, b: Obj) -> str:
    word = relation(a, b)
    return f"{word} of" if word in ("left", "right") else word


def rich_caption(scene: Scene) -> str:
    """A caption: object count, every object, and one spatial relation."""
    n = len(scene.objects)
    text = f"{n} object{'s' if n > 1 else ''}: {scene_caption(scene)}"
    if n > 1:
        a, b = sorted(scene.objects, key=lambda o: (o.row, o.col))[:2]
        text += f" the {a.kind} is {_relation_phrase(a, b)} the {b.kind}."
    return text


def _scene_row(rng: random.Random, scene: Scene, size: int, prompt: str, answer: str) -> Row:
    return png_bytes(draw(scene, rng, size)), prompt, answer


def _caption(rng: random.Random, size: int) -> Row:
    domain = "shift" if rng.random() < 0.15 else "default"  # some dim, textured scenes: varied light
    scene = random_scene(rng, rng.randint(1, 4), domain)
    return _scene_row(rng, scene, size, DESCRIBE, rich_caption(scene))


def _presence(rng: random.Random, size: int) -> Row:
    scene = random_scene(rng, rng.randint(2, 4), distinct_kinds=True)
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        return _scene_row(rng, scene, size, f"Can you see a {colour} {shape}?", f"yes, there is a {colour} {shape}.")
    colour, shape = rng.choice(near_misses(scene))
    return _scene_row(rng, scene, size, f"Can you see a {colour} {shape}?", f"no, there is no {colour} {shape}.")


def _how_many(rng: random.Random, size: int) -> Row:
    n = rng.randint(1, 6)
    scene = random_scene(rng, n)
    return _scene_row(rng, scene, size, "Count the shapes.", f"there {'is one shape' if n == 1 else f'are {n} shapes'}.")


def _position(rng: random.Random, size: int) -> Row:
    scene = random_scene(rng, rng.randint(2, 4), distinct_kinds=True)
    a, b = rng.sample(scene.objects, 2)
    return _scene_row(rng, scene, size, f"Where is the {a.kind} compared with the {b.kind}?",
                      f"the {a.kind} is {_relation_phrase(a, b)} the {b.kind}.")


def _where(rng: random.Random, size: int) -> Row:
    scene = random_scene(rng, rng.randint(2, 4), distinct_kinds=True)
    obj = rng.choice(scene.objects)
    return _scene_row(rng, scene, size, f"Where is the {obj.kind}?", f"the {obj.kind} is at the {obj.location}.")


def _unique(rng: random.Random, key: str) -> tuple[Scene, Obj]:
    """A scene of 2-4 objects and one of them whose `key` (colour or shape) no other object has."""
    while True:
        scene = random_scene(rng, rng.randint(2, 4), distinct_kinds=True)
        values = [getattr(o, key) for o in scene.objects]
        unique = [o for o in scene.objects if values.count(getattr(o, key)) == 1]
        if unique:
            return scene, rng.choice(unique)


def _colour_of(rng: random.Random, size: int) -> Row:
    scene, obj = _unique(rng, "shape")
    return _scene_row(rng, scene, size, f"What colour is the {obj.shape}?", f"the {obj.shape} is {obj.colour}.")


def _shape_of(rng: random.Random, size: int) -> Row:
    scene, obj = _unique(rng, "colour")
    return _scene_row(rng, scene, size, f"What shape is the {obj.colour} object?",
                      f"the {obj.colour} object is a {obj.shape}.")


def _bigger(rng: random.Random, size: int) -> Row:
    a, b = random_scene(rng, 2, distinct_kinds=True).objects
    a, b = Obj(a.colour, a.shape, "large", a.row, a.col), Obj(b.colour, b.shape, "small", b.row, b.col)
    scene = Scene(tuple(rng.sample([a, b], 2)))
    first, second = rng.sample([a, b], 2)
    word = "larger" if first is a else "smaller"
    return _scene_row(rng, scene, size, f"Compare the {first.kind} and the {second.kind}.",
                      f"the {first.kind} is {word} than the {second.kind}.")


def _attribute(rng: random.Random, size: int) -> Row:
    obj = random_scene(rng, 1).objects[0]
    scene = Scene((obj,))
    ask = rng.choice(("colour", "shape", "size", "place"))
    answer = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "place": obj.location}[ask]
    return _scene_row(rng, scene, size, f"Tell me the {ask} of the object.", f"its {ask} is {answer}.")


def _word(rng: random.Random, size: int) -> Row:
    word = rng.choice(english_words())
    return png_bytes(render_word(word, rng, size)), "What is written here?", f"it says {word}."


def _glyph(rng: random.Random, size: int) -> Row:
    image, index = labelled_glyph(rng, size)
    return png_bytes(image), "What is written here?", f"it says {GLYPHS[index]}."


def render_word(word: str, rng: random.Random, size: int, font_size: int | None = None) -> Image.Image:
    """`word` in dark type on a light, noisy background, at a random position that keeps it whole."""
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    image = noise.point([226 + v * 24 // 256 for v in range(256)] * 3)
    pen = ImageDraw.Draw(image)
    font_size = max(6, font_size or size // 4)
    font = ImageFont.load_default(size=font_size)
    while font_size > 6 and pen.textbbox((0, 0), word, font=font)[2] > size - 2:
        font_size -= 1
        font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = pen.textbbox((0, 0), word, font=font)
    x = rng.randint(0, max(0, size - (right - left) - 1)) - left
    y = rng.randint(0, max(0, size - (bottom - top) - 1)) - top
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    pen.text((x, y), word, font=font, fill=ink)
    return image


# Kind of row -> builder. Each kind teaches a skill and its answer words.
KINDS: dict[str, Callable[[random.Random, int], Row]] = {
    "caption": _caption, "presence": _presence, "count": _how_many, "position": _position,
    "bigger": _bigger, "attribute": _attribute, "word": _word, "glyph": _glyph,
    "where": _where, "colour_of": _colour_of, "shape_of": _shape_of,
}
# The whole-model stage's weights over KINDS: every skill and answer word.
MIXTURE: dict[str, float] = {
    "caption": 0.26, "presence": 0.16, "count": 0.06, "position": 0.12, "bigger": 0.10,
    "attribute": 0.06, "word": 0.12, "glyph": 0.06, "colour_of": 0.06,
}
# The binding stage's weights: questions that name an object among others, so the LM must find the
# image token that has both named attributes. A tiny LM learns this retrieval only after a plateau
# of some hundred steps on such rows, and not at all when they are a few percent of a mixture
# (docs/ARCHITECTURE.md, "The built-in backbone").
BINDING: dict[str, float] = {
    "presence": 0.2, "position": 0.3, "where": 0.15, "colour_of": 0.1, "shape_of": 0.1,
    "caption": 0.05, "word": 0.05, "glyph": 0.05,
}


def draw_rows(rng: random.Random, weights: dict[str, float], n: int, image_size: int) -> list[Row]:
    """`n` rows whose kinds are drawn from `weights` over KINDS."""
    kinds, shares = list(weights), list(weights.values())
    return [KINDS[rng.choices(kinds, shares)[0]](rng, image_size) for _ in range(n)]


def corpus(seed: int, n: int, image_size: int) -> list[Row]:
    """`n` pretraining rows drawn from MIXTURE, deterministically from `seed`."""
    return draw_rows(random.Random(f"pretrain:{seed}"), MIXTURE, n, image_size)


def tokenizer_text(rows: list[Row]) -> list[str]:
    """What the tokenizer is trained on: English words (weighted up), the mixture's prompts and answers."""
    words = " ".join(english_words())
    return [words] * 20 + [f"{p} {a}" for _, p, a in rows] + [" ".join(SIZES)]


# The vision stage's labels. Per grid cell: colour, shape and size class ids, 0 for an empty cell.
CELL_LABELS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}
GLYPHS = string.digits + string.ascii_lowercase


def cell_labels(scene: Scene) -> list[list[int]]:
    """Each of the 9 grid cells' (colour, shape, size) class ids, row-major; 0 marks an empty cell."""
    labels = [[0] * len(CELL_LABELS) for _ in range(9)]
    for obj in scene.objects:
        values = (obj.colour, obj.shape, obj.size)
        labels[3 * obj.row + obj.col] = [names.index(v) + 1 for names, v in zip(CELL_LABELS.values(), values)]
    return labels


def labelled_scene(rng: random.Random, size: int) -> tuple[Image.Image, list[list[int]]]:
    """A scene of 0-5 objects (30% in the dim domain), drawn, with its cell labels."""
    scene = random_scene(rng, rng.randint(0, 5), "shift" if rng.random() < 0.3 else "default")
    return draw(scene, rng, size), cell_labels(scene)


def labelled_glyph(rng: random.Random, size: int) -> tuple[Image.Image, int]:
    """One digit or lowercase letter at a random size and place, and its index in GLYPHS."""
    index = rng.randrange(len(GLYPHS))
    return render_word(GLYPHS[index], rng, size, font_size=rng.randint(size // 4, size * 3 // 4)), index
