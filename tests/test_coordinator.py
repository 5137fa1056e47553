"""The stream coordinator: its state machine in-process, then as a detached Ray actor that is killed."""

from __future__ import annotations

import json
import os
import time

import pytest

from strata.coordinator import Coordinator, StreamState, TaskBusy, actor_name


def adapter(state: StreamState) -> dict:
    return {"name": "dgg", "version": state.next_version("dgg"), "registry": "/x/registry"}


def promote(state: StreamState, task: str, owner: str = "job-a", **record) -> dict:
    state.begin_task("dgg", task, owner)
    state.set_status("dgg", task, owner, "evaluated", accuracy={task: 50.0})
    return state.commit_task("dgg", task, owner, "promoted", {"adapter": adapter(state), **record})


def test_timeline_versions_and_pointers_survive_a_reload(tmp_path) -> None:
    state = StreamState("s1", str(tmp_path))
    colour = {"optimum": {"path": "adapters/shared", "sha256": "a" * 64},
              "freeze_masks": {"path": "cma_freeze.json", "sha256": "b" * 64},
              "buffer/colour": {"path": "buffer/colour.parquet", "sha256": "c" * 64}}
    shape = {"optimum": {"path": "adapters/shared", "sha256": "d" * 64}}
    promote(state, "colour", records=colour)
    entry = promote(state, "shape", records=shape)
    assert "records" not in entry  # the records sit with the strategy, not in the timeline entry
    assert entry["version"] == 2 and entry["status"] == "promoted"
    assert [h["status"] for h in entry["history"]] == ["arrived", "training", "evaluated", "promoted"]

    again = StreamState("s1", str(tmp_path))  # what a restarted actor does
    assert again.reloaded and not state.reloaded
    snap = again.snapshot()["strategies"]["dgg"]
    assert [e["task"] for e in snap["timeline"]] == ["colour", "shape"]
    assert [v["version"] for v in snap["adapters"]["dgg"]] == [1, 2]
    assert again.next_version("dgg") == 3  # the allocator survives the reload too
    assert snap["records"] == {"colour": colour, "shape": shape}  # θ* and state per task: paths and hashes
    assert again.snapshot()["schema"] == 2
    assert [p.name for p in (tmp_path / "s1").iterdir()] == ["coordinator.json"]  # no temp file left behind


def test_a_second_job_for_a_training_task_is_refused_and_retries_are_idempotent(tmp_path) -> None:
    state = StreamState("s2", str(tmp_path))
    first = state.begin_task("dgg", "colour", "job-a")
    assert state.begin_task("dgg", "colour", "job-a") == first  # Ray retried the call: nothing new
    with pytest.raises(TaskBusy, match=r"'colour' of stream 's2' \(dgg\) is already training in job job-a"):
        state.begin_task("dgg", "colour", "job-b")
    with pytest.raises(TaskBusy, match="release s2 dgg colour"):
        state.reset("dgg", "job-b")
    with pytest.raises(TaskBusy, match="belongs to job job-a"):
        state.set_status("dgg", "colour", "job-b", "evaluated")
    state.set_status("dgg", "colour", "job-a", "evaluated")
    record = {"adapter": adapter(state)}
    done = state.commit_task("dgg", "colour", "job-a", "promoted", record)
    assert state.commit_task("dgg", "colour", "job-a", "promoted", record) == done
    assert len(state.snapshot()["strategies"]["dgg"]["adapters"]["dgg"]) == 1  # not versioned twice
    assert state.snapshot()["strategies"]["dgg"]["records"] == {"colour": {}}  # none named: an empty set
    with pytest.raises(TaskBusy, match="already promoted"):
        state.begin_task("dgg", "colour", "job-c")


def test_a_rejected_task_can_arrive_again_after_the_tasks_learned_meanwhile(tmp_path) -> None:
    state = StreamState("s5", str(tmp_path))
    state.begin_task("dgg", "colour", "job-a")
    state.commit_task("dgg", "colour", "job-a", "rejected", {"reasons": ["colour below its floor"]})
    promote(state, "shape")
    retry = state.begin_task("dgg", "colour", "job-b")
    assert retry["attempt"] == 2 and [e["task"] for e in state.timeline("dgg")] == ["shape", "colour"]


def test_a_dead_jobs_task_can_be_released_and_retrained(tmp_path) -> None:
    state = StreamState("s3", str(tmp_path))
    state.begin_task("seqlora", "colour", "dead-job")
    assert state.release("seqlora", "colour")["status"] == "failed"
    entry = state.begin_task("seqlora", "colour", "job-b")
    assert entry["attempt"] == 2 and entry["owner"] == "job-b"
    with pytest.raises(KeyError, match="no task 'shape'"):
        state.release("seqlora", "shape")


def test_bad_names_and_statuses_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="invalid stream name"):
        StreamState("../escape", str(tmp_path))
    state = StreamState("s4", str(tmp_path))
    with pytest.raises(ValueError, match="invalid task name"):
        state.begin_task("dgg", "a/b", "job")
    state.begin_task("dgg", "colour", "job")
    with pytest.raises(ValueError, match="unknown task status 'done'"):
        state.set_status("dgg", "colour", "job", "done")
    with pytest.raises(ValueError, match="commit_task needs one of"):
        state.commit_task("dgg", "colour", "job", "evaluated", {})


@pytest.mark.integration
def test_the_actor_is_named_detached_and_restarts_with_its_state(ray_cluster, tmp_path) -> None:
    import ray

    coord = Coordinator("actor-s", str(tmp_path))
    assert Coordinator("actor-s", str(tmp_path)).actor._actor_id == coord.actor._actor_id  # get_if_exists
    coord.begin_task("dgg", "colour", "job-a")
    before = coord.info()
    ray.kill(ray.get_actor(actor_name("actor-s", str(tmp_path)), namespace="strata"), no_restart=False)
    # ray.kill only asks: the old process may answer a call or two before it dies.
    deadline = time.monotonic() + 60
    while (after := coord.info())["pid"] == before["pid"]:
        assert time.monotonic() < deadline, "the coordinator actor was not restarted"
        time.sleep(0.2)
    assert after["reloaded"]  # the new process reloads what was acknowledged
    assert coord.timeline("dgg")[0]["status"] == "training"
    with pytest.raises(TaskBusy):
        coord.begin_task("dgg", "colour", "job-b")
    elsewhere = Coordinator("actor-s", str(tmp_path / "elsewhere"))  # same name, other storage: another stream
    assert elsewhere.timeline("dgg") == [] and elsewhere.actor._actor_id != coord.actor._actor_id
    state = json.loads((tmp_path / "actor-s" / "coordinator.json").read_text())
    assert state["strategies"]["dgg"]["timeline"][0]["owner"] == "job-a"
    assert os.getpid() not in (before["pid"], after["pid"])  # it really is another process
