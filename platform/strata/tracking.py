"""Experiment tracking: every task's training curve as TensorBoard event files under the run directory.

`write_curve` is called by the driver when a task's training returns (the curve rides back in its
final metrics); `read_scalars` reads the files back for the console, without TensorBoard installed:
an event file is a sequence of length-prefixed records, each an `Event` protocol buffer.
"""

from __future__ import annotations

import struct
from pathlib import Path

from strata.config import check_name


def write_curve(logdir: Path, task: str, curve: list[list]) -> None:
    """One task's curve, rows of [step, training loss, val loss or None], as scalars `loss` and `val_loss`."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(logdir / check_name(task, "task name"))) as writer:
        for step, loss, val in curve:
            writer.add_scalar("loss", loss, step)
            if val is not None:
                writer.add_scalar("val_loss", val, step)


def read_scalars(logdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every run under `logdir` (one per task): tag -> [(step, value)], in the order written."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for path in sorted(logdir.glob("*/events.out.tfevents.*")):
        tags = out.setdefault(path.parent.name, {})
        for record in _records(path.read_bytes()):
            event = Event.FromString(record)
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _records(data: bytes):
    """The payloads of a TFRecord file: u64 length, u32 length CRC, payload, u32 payload CRC."""
    at = 0
    while at + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        if at + 12 + length + 4 > len(data):  # a record still being written
            return
        yield data[at + 12 : at + 12 + length]
        at += 12 + length + 4
