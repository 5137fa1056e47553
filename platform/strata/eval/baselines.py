"""Two baselines per task, on the task's own train and test splits: the constant answer, and a
linear classifier on the raw pixels.

A frozen VLM with an adapter should beat both. A task whose adapter does not has not been learned,
whatever its forgetting numbers say: forgetting a task that was never learned costs nothing.
"""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from strata.eval.scoring import normalize

PIXELS = 24  # images are shrunk to 24×24 RGB for the linear model: 1,728 features
MAX_CLASSES = 50  # answers beyond this many distinct values are free text: no pixel classifier


def _split(table: pa.Table, name: str) -> pa.Table:
    return table.filter(pc.equal(table["split"], name))


def constant_answer(train: list[str], test: list[str]) -> float | None:
    """Accuracy (%) on `test` of always answering the most common train answer (None without rows)."""
    if not train or not test:
        return None
    majority = Counter(normalize(a) for a in train).most_common(1)[0][0]
    return 100.0 * sum(normalize(a) == majority for a in test) / len(test)


def _pixels(images: list[bytes]) -> torch.Tensor:
    rows = []
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            small = img.convert("RGB").resize((PIXELS, PIXELS), Image.Resampling.BILINEAR)
        rows.append(torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).float() / 255.0)
    return torch.stack(rows)


def pixel_classifier(train_images: list[bytes], train: list[str], test_images: list[bytes], test: list[str],
                     steps: int = 300, seed: int = 0) -> float | None:
    """Accuracy (%) on `test` of softmax regression on the raw pixels, trained on the train rows;
    None when the answers are free text (more than MAX_CLASSES distinct)."""
    classes = sorted({normalize(a) for a in train})
    if not train or not test or len(classes) > MAX_CLASSES:
        return None
    x_train, x_test = _pixels(train_images), _pixels(test_images)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y = torch.tensor([classes.index(normalize(a)) for a in train])
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[1], len(classes))
    opt = torch.optim.Adam(linear.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y).backward()
        opt.step()
    with torch.no_grad():
        said = [classes[i] for i in linear(x_test).argmax(1).tolist()]
    return 100.0 * sum(s == normalize(a) for s, a in zip(said, test)) / len(test)


def task_baselines(table: pa.Table) -> dict[str, float | None]:
    """Both baselines for one task's dataset: its train rows fit them, its test rows score them."""
    train, test = _split(table, "train"), _split(table, "test")
    train_answers, test_answers = train["answer"].to_pylist(), test["answer"].to_pylist()
    return {"constant": constant_answer(train_answers, test_answers),
            "pixels": pixel_classifier(train["image"].to_pylist(), train_answers, test["image"].to_pylist(),
                                       test_answers)}
