"""Dispatcher scheduling, idempotency and recovery, with a recording executor
and a real journal on disk."""

from __future__ import annotations

import asyncio

from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.dispatcher import Dispatcher, target_key
from stella_agent.executors.base import Outcome
from stella_agent.journal import RUNNING, Journal
from stella_agent.runner import TaskRunner


class RecordingExecutor:
    """Runs instantly or until released; records the order of runs."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.active: set[str] = set()
        self.max_active = 0
        self.release = asyncio.Event()
        self.block = False
        self.recovered: list[tuple[str, str, dict]] = []

    async def run(self, context):
        task_id = context.task.id
        self.started.append(task_id)
        self.active.add(task_id)
        self.max_active = max(self.max_active, len(self.active))
        try:
            while self.block and not self.release.is_set():
                context.checkpoint()
                await asyncio.sleep(0.01)
            context.checkpoint()
        finally:
            self.active.discard(task_id)
        return Outcome(outputs={"ran": task_id})

    async def recover(self, context, phase):
        self.recovered.append((context.task.id, phase, dict(context.notes)))
        return Outcome(outputs={"recovered": phase})


def make(tmp_path, executor, **tasks_config):
    config = config_from_mapping(
        {"agent_id": "unit", "state_dir": str(tmp_path), "tasks": tasks_config}
    )
    journal = Journal(tmp_path / "journal.db")
    events, results = [], []
    dispatcher = Dispatcher(
        TaskRunner(config, {"docker": executor}),
        journal,
        on_event=events.append,
        chunk_sink_for=lambda task_id: None,
        on_result=results.append,
    )
    return dispatcher, journal, events, results


def inspect_task(task_id, container="web", priority=0, key=""):
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_INSPECT,
        priority=priority,
        idempotency_key=key,
        inspect=task_pb2.InspectPayload(container_name=container),
    )


async def settle(dispatcher, results, count, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while len(results) < count:
        assert asyncio.get_running_loop().time() < deadline, (
            f"only {len(results)} results"
        )
        await asyncio.sleep(0.01)


def test_same_task_id_twice_runs_once(tmp_path):
    executor = RecordingExecutor()

    async def scenario():
        dispatcher, _, events, results = make(tmp_path, executor)
        dispatcher.receive(inspect_task("t1"))
        await settle(dispatcher, results, 1)
        dispatcher.receive(inspect_task("t1"))
        await settle(dispatcher, results, 2)
        return events, results

    events, results = asyncio.run(scenario())

    assert executor.started == ["t1"]
    assert [r.task_id for r in results] == ["t1", "t1"]
    assert events[-1].task_accepted.duplicate


def test_same_task_id_after_restart_returns_stored_result(tmp_path):
    executor = RecordingExecutor()

    async def first_life():
        dispatcher, journal, _, results = make(tmp_path, executor)
        dispatcher.receive(inspect_task("t1"))
        await settle(dispatcher, results, 1)
        journal.close()

    async def second_life():
        dispatcher, _, _, results = make(tmp_path, executor)
        dispatcher.receive(inspect_task("t1"))
        return results

    asyncio.run(first_life())
    results = asyncio.run(second_life())

    assert executor.started == ["t1"]
    assert results[0].outputs["ran"] == "t1"


def test_fifty_tasks_with_one_idempotency_key_run_once(tmp_path):
    executor = RecordingExecutor()
    executor.block = True

    async def scenario():
        dispatcher, _, _, results = make(tmp_path, executor)
        for n in range(50):
            dispatcher.receive(inspect_task(f"t{n}", key="deploy-42"))
        await asyncio.sleep(0.05)
        executor.release.set()
        await settle(dispatcher, results, 50)
        return results

    results = asyncio.run(scenario())

    assert executor.started == ["t0"]
    assert sorted(r.task_id for r in results) == sorted(f"t{n}" for n in range(50))
    assert all(r.success for r in results)
    assert {r.outputs["original_task_id"] for r in results if r.task_id != "t0"} == {
        "t0"
    }


def test_one_task_per_target_and_priority_order(tmp_path):
    executor = RecordingExecutor()
    executor.block = True

    async def scenario():
        dispatcher, _, _, results = make(tmp_path, executor, max_concurrent=4)
        dispatcher.receive(inspect_task("first", container="web"))
        await asyncio.sleep(0.05)
        dispatcher.receive(inspect_task("low", container="web", priority=1))
        dispatcher.receive(inspect_task("high", container="web", priority=9))
        dispatcher.receive(inspect_task("other", container="db"))
        await asyncio.sleep(0.05)
        executor.release.set()
        await settle(dispatcher, results, 4)

    asyncio.run(scenario())

    web_order = [t for t in executor.started if t in ("first", "low", "high")]
    assert web_order == ["first", "high", "low"]
    assert executor.started.index("other") < executor.started.index("high")


def test_busy_policy_reject_rejects_second_task(tmp_path):
    executor = RecordingExecutor()
    executor.block = True

    async def scenario():
        dispatcher, _, events, results = make(tmp_path, executor, busy_policy="reject")
        dispatcher.receive(inspect_task("a"))
        await asyncio.sleep(0.05)
        dispatcher.receive(inspect_task("b"))
        executor.release.set()
        await settle(dispatcher, results, 2)
        return events, results

    events, results = asyncio.run(scenario())

    rejected = [
        e.task_rejected for e in events if e.WhichOneof("body") == "task_rejected"
    ]
    assert [r.task_id for r in rejected] == ["b"]
    assert rejected[0].error_type == "busy"
    assert rejected[0].retriable
    assert executor.started == ["a"]


def test_expired_task_is_rejected_unrun(tmp_path):
    executor = RecordingExecutor()
    task = inspect_task("old")
    task.expires_at.CopyFrom(Timestamp(seconds=1_000_000))

    async def scenario():
        dispatcher, _, _, results = make(tmp_path, executor)
        dispatcher.receive(task)
        return results

    results = asyncio.run(scenario())

    assert executor.started == []
    assert results[0].error_type == "expired"


def test_cancel_of_pending_task_never_runs_it(tmp_path):
    executor = RecordingExecutor()
    executor.block = True

    async def scenario():
        dispatcher, _, _, results = make(tmp_path, executor)
        dispatcher.receive(inspect_task("running"))
        dispatcher.receive(inspect_task("waiting"))
        await asyncio.sleep(0.05)
        dispatcher.cancel("waiting", "operator changed their mind")
        dispatcher.cancel("running", "stop it")
        await settle(dispatcher, results, 2)
        return results

    results = asyncio.run(scenario())

    by_id = {r.task_id: r for r in results}
    assert executor.started == ["running"]
    assert by_id["waiting"].error_type == "cancelled"
    assert by_id["running"].error_type == "cancelled"


def test_recover_requeues_received_and_recovers_running(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.record_received(inspect_task("queued"), "docker:web")
    journal.record_received(inspect_task("midway", container="api"), "docker:api")
    journal.set_phase("midway", "health")
    journal.add_notes("midway", {"previous_container_id": "abc"})
    journal.close()
    executor = RecordingExecutor()

    async def scenario():
        dispatcher, journal, _, results = make(tmp_path, executor)
        await dispatcher.recover()
        await settle(dispatcher, results, 2)
        return journal, results

    journal, results = asyncio.run(scenario())

    assert executor.recovered == [
        ("midway", "health", {"previous_container_id": "abc"})
    ]
    assert executor.started == ["queued"]
    assert journal.unfinished() == []
    assert {r.task_id for r in results} == {"queued", "midway"}
    assert len(journal.outbox()) == 2


def test_outbox_keeps_result_until_acknowledged(tmp_path):
    executor = RecordingExecutor()

    async def scenario():
        dispatcher, journal, _, results = make(tmp_path, executor)
        dispatcher.receive(inspect_task("t1"))
        await settle(dispatcher, results, 1)
        return journal

    journal = asyncio.run(scenario())

    assert [r.task_id for r in journal.outbox()] == ["t1"]
    journal.acknowledge("t1")
    assert journal.outbox() == []


def test_drain_answers_pending_and_refuses_new(tmp_path):
    executor = RecordingExecutor()
    executor.block = True

    async def scenario():
        dispatcher, _, _, results = make(tmp_path, executor)
        dispatcher.receive(inspect_task("running"))
        dispatcher.receive(inspect_task("pending"))
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(dispatcher.drain(5))
        await asyncio.sleep(0.05)
        dispatcher.receive(inspect_task("late", container="db"))
        executor.release.set()
        await drain
        await settle(dispatcher, results, 3)
        return results

    results = asyncio.run(scenario())

    by_id = {r.task_id: r for r in results}
    assert by_id["running"].success
    assert by_id["pending"].error_type == "shutting_down"
    assert by_id["late"].error_type == "shutting_down"
    assert executor.started == ["running"]


def test_target_key_distinguishes_executors():
    docker_task = inspect_task("a", container="web")
    compose_task = task_pb2.AgentTask(
        id="b",
        type=task_pb2.TASK_TYPE_INSPECT,
        executor=task_pb2.EXECUTOR_COMPOSE,
        inspect=task_pb2.InspectPayload(stack_name="shop"),
    )

    same_project = task_pb2.AgentTask(
        id="c",
        type=task_pb2.TASK_TYPE_INSPECT,
        executor=task_pb2.EXECUTOR_COMPOSE,
        inspect=task_pb2.InspectPayload(stack_name="Shop"),
    )

    assert target_key(docker_task) == "docker:web"
    assert target_key(compose_task) == "compose:shop"
    assert target_key(same_project) == "compose:shop"


def test_journal_records_running_phase(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.record_received(inspect_task("t"), "docker:web")

    journal.set_phase("t", "pull")

    stored = journal.get("t")
    assert stored.state == RUNNING
    assert stored.phase == "pull"
