"""The built-in continual stream: eight instruction tasks on procedurally drawn scenes.

Each task has its own prompt wording (so a router can tell tasks apart from the text) and an
answer format that conflicts with the others ("red" vs "circle" vs "3" vs "left" vs "yes"), so a
single shared adapter fine-tuned on one task really forgets the others. Everything is
deterministic from (task, seed), and every table is written in the public schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from strata.atomic import write_text
from strata.data.scenes import (
    CELLS,
    COLOURS,
    LOCATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    draw,
    near_misses,
    png_bytes,
    random_scene,
)
from strata.data.schema import SCHEMA, with_history, write_table

TASKS = ("colour", "shape", "count", "location", "exists", "relation", "size", "shift")
# Bump when generation changes, so cached benchmark files are regenerated.
BENCHMARK_VERSION = 2

COLOUR_NAMES = tuple(COLOURS)
COUNT_ANSWERS = ("1", "2", "3", "4", "5")
YES_NO = ("yes", "no")
RELATIONS = ("left", "right", "above", "below")

# Several paraphrases per task, so that telling tasks apart means reading the question, not
# matching one fixed template. No paraphrase is shared between tasks.
PROMPTS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the object?", "Which colour does the shape have?",
               "Name the colour of the object.", "What is the colour of this shape?"),
    "shape": ("What shape is shown?", "Which shape is drawn here?", "Name the shape in the picture.",
              "What kind of shape is this?"),
    "count": ("How many objects are in the picture?", "How many shapes can you count?",
              "Count the objects in the image.", "What is the number of shapes shown?"),
    "location": ("Where is the object located?", "In which part of the picture is the shape?",
                 "Where in the image is the object?", "Which region holds the shape?"),
    "exists": ("Is there a {colour} {shape} in the image?", "Does the picture contain a {colour} {shape}?",
               "Can a {colour} {shape} be found here?", "Is a {colour} {shape} present?"),
    "relation": ("Where is the {c1} {s1} relative to the {c2} {s2}?",
                 "How is the {c1} {s1} placed with respect to the {c2} {s2}?",
                 "Relative to the {c2} {s2}, where is the {c1} {s1}?",
                 "What is the position of the {c1} {s1} compared to the {c2} {s2}?"),
    "size": ("Which is larger, the {c1} {s1} or the {c2} {s2}?", "Which one is bigger: the {c1} {s1} or the {c2} {s2}?",
             "Of the {c1} {s1} and the {c2} {s2}, which is larger?",
             "Name the bigger object, the {c1} {s1} or the {c2} {s2}."),
    "shift": ("Name the colour of the shape in this dark scene.", "In this dim picture, what colour is the shape?",
              "What colour is the object on the dark background?", "Which colour does the shape in the dark image have?"),
}


def _prompt(rng: random.Random, task: str, **names: str) -> str:
    return rng.choice(PROMPTS[task]).format(**names)


# A builder turns a target answer (drawn from a balanced list) into (scene, prompt, answer).
Example = tuple[Scene, str, str]
Builder = Callable[[random.Random, str], Example]


def _one_object(
    rng: random.Random,
    domain: str = "default",
    colour: str | None = None,
    shape: str | None = None,
    cell: tuple[int, int] | None = None,
) -> Scene:
    """One object; attributes not given are random."""
    row, col = cell if cell is not None else rng.choice(CELLS)
    obj = Obj(
        colour or rng.choice(COLOUR_NAMES), shape or rng.choice(SHAPES), rng.choice(SIZES), row, col
    )
    return Scene((obj,), domain)


def _colour(rng: random.Random, target: str) -> Example:
    return _one_object(rng, colour=target), _prompt(rng, "colour"), target


def _shape(rng: random.Random, target: str) -> Example:
    return _one_object(rng, shape=target), _prompt(rng, "shape"), target


def _count(rng: random.Random, target: str) -> Example:
    return random_scene(rng, int(target)), _prompt(rng, "count"), target


def _location(rng: random.Random, target: str) -> Example:
    cell = divmod(LOCATIONS.index(target), 3)
    return _one_object(rng, cell=cell), _prompt(rng, "location"), target


def _exists(rng: random.Random, target: str) -> Example:
    scene = random_scene(rng, rng.choice((2, 3)), distinct_kinds=True)
    if target == "yes":
        colour, shape = rng.choice(sorted((o.colour, o.shape) for o in scene.objects))
    else:
        colour, shape = rng.choice(near_misses(scene))  # so that "no" needs binding
    return scene, _prompt(rng, "exists", colour=colour, shape=shape), target


def _relation_cells(rng: random.Random, target: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells (first, second) so that the first object is `target` relative to the second."""
    while True:
        a, b = rng.sample(CELLS, 2)
        if a[1] != b[1]:
            answer = "left" if a[1] < b[1] else "right"
        else:
            answer = "above" if a[0] < b[0] else "below"
        if answer == target:
            return a, b


def _relation(rng: random.Random, target: str) -> Example:
    a, b = _relation_cells(rng, target)
    scene = random_scene(rng, 2, cells=(a, b), distinct_kinds=True)
    first, second = scene.objects
    if (first.row, first.col) != a:
        first, second = second, first
    prompt = _prompt(rng, "relation", c1=first.colour, s1=first.shape, c2=second.colour, s2=second.shape)
    return scene, prompt, target


def _size(rng: random.Random, target: str) -> Example:
    # target is "first" or "second": which mentioned object is the larger, balanced by position.
    a, b = random_scene(rng, 2, distinct_kinds=True).objects
    big_first = target == "first"
    first = Obj(a.colour, a.shape, "large" if big_first else "small", a.row, a.col)
    second = Obj(b.colour, b.shape, "small" if big_first else "large", b.row, b.col)
    scene = Scene(tuple(rng.sample([first, second], 2)))  # draw order says nothing
    prompt = _prompt(rng, "size", c1=first.colour, s1=first.shape, c2=second.colour, s2=second.shape)
    larger = first if big_first else second
    return scene, prompt, larger.kind


def _shift(rng: random.Random, target: str) -> Example:
    return _one_object(rng, "shift", colour=target), _prompt(rng, "shift"), target


# Each task: its builder and the list of targets it balances over.
_TASK_SPECS: dict[str, tuple[Builder, Sequence[str]]] = {
    "colour": (_colour, COLOUR_NAMES),
    "shape": (_shape, SHAPES),
    "count": (_count, COUNT_ANSWERS),
    "location": (_location, LOCATIONS),
    "exists": (_exists, YES_NO),
    "relation": (_relation, RELATIONS),
    "size": (_size, ("first", "second")),
    "shift": (_shift, COLOUR_NAMES),
}


def _balanced_targets(rng: random.Random, choices: Sequence[str], n: int) -> list[str]:
    targets = [choices[i % len(choices)] for i in range(n)]
    rng.shuffle(targets)
    return targets


def generate_task(
    task: str,
    seed: int,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 500,
    image_size: int = 48,
) -> pa.Table:
    """Generate one task's train/val/test rows in SCHEMA (single-turn), deterministically from (task, seed)."""
    if task not in _TASK_SPECS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    builder, choices = _TASK_SPECS[task]
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    train_keys: set[tuple[str, str]] = set()
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        # One generator per split, so the test set does not change when n_train does.
        rng = random.Random(f"{task}:{seed}:{split}")
        for target in _balanced_targets(rng, choices, n):
            while True:
                scene, prompt, answer = builder(rng, target)
                image = png_bytes(draw(scene, rng, image_size))
                key = (prompt, hashlib.sha256(image).hexdigest())
                # Jitter and noise make a repeat vanishingly rare; redraw to make it impossible.
                if split != "test" or key not in train_keys:
                    break
            if split == "train":
                train_keys.add(key)
            columns["id"].append(f"{task}-{len(columns['id']):06d}")
            columns["image"].append(image)
            columns["prompt"].append(prompt)
            columns["answer"].append(answer)
            columns["split"].append(split)
    return with_history(pa.table(columns, schema=SCHEMA))


def write_benchmark(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 500,
    image_size: int = 48,
) -> dict[str, Path]:
    """Write `<out_dir>/<task>.parquet` for each task, skipping files already generated alike."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for task in tasks:
        args = {
            "task": task,
            "seed": seed,
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "image_size": image_size,
            "version": BENCHMARK_VERSION,
        }
        path, sidecar = out / f"{task}.parquet", out / f"{task}.json"
        paths[task] = path
        if path.exists() and sidecar.exists():
            try:
                if json.loads(sidecar.read_text()) == args:
                    continue
            except json.JSONDecodeError:
                pass  # a corrupt sidecar just means regenerate
        # Drop the sidecar first: it is written last, so its presence means the Parquet is whole.
        sidecar.unlink(missing_ok=True)
        write_table(generate_task(task, seed, n_train, n_val, n_test, image_size), path)
        write_text(sidecar, json.dumps(args, indent=2, sort_keys=True))
    return paths


def vocabulary_text() -> list[str]:
    """Every prompt paraphrase and answer word of the built-in stream, for the tokenizer."""
    names = {"colour": "red", "shape": "circle", "c1": "red", "s1": "circle", "c2": "blue", "s2": "square"}
    texts = [p.format(**names) for paraphrases in PROMPTS.values() for p in paraphrases]
    texts += list(COLOUR_NAMES) + list(SHAPES) + list(COUNT_ANSWERS) + list(LOCATIONS)
    return texts + list(YES_NO) + list(RELATIONS)
