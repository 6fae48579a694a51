"""An in-process Flower engine: the ServerApp and the ClientApp in one process, on real Messages.

Flower's simulation engine (Ray) costs 5-20 s a run to start actors and stop them again, while
the rounds of a small experiment take a fraction of that. :class:`InProcessGrid` is a
:class:`flwr.serverapp.Grid` that hands each message to the ClientApp object in the calling
process instead, as Flower's own runtimes do it:

* every message crosses Flower 1.42's wire form both ways: the sender deflates the message and
  each nested object (RecordDict, ArrayRecord, Array chunks...) to the bytes a SuperLink stores,
  the receiver checks each object's SHA-256 id and inflates the message from those bytes
  (``flwr.supercore.inflatable``, as ``HttpGrid`` and ``flwr-clientapp`` do). The ServerApp thus
  receives exactly what it would receive over the network, and nothing is shared by reference;
* the ClientApp is called as ``client_app(message=..., context=...)`` with the node's own
  :class:`flwr.app.Context` (``node_config`` ``{"partition-id": i, "num-partitions": n}``, the
  run config, and a ``state`` RecordDict kept between messages as a SuperNode keeps it: as its
  protobuf ``Context``, so what persists is what was serialised after the last successful call);
* a ClientApp that raises yields an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason
  ``"<class ...>:<'...'>"``), not an exception in the ServerApp; a reply that is not a valid reply
  to its instruction is dropped with a logged error, as a SuperLink drops it; an instruction
  whose TTL ran out before delivery is answered with the SuperLink's ``MESSAGE_UNAVAILABLE`` error;
* the client runs with the caller's global RNG state saved and restored (torch, numpy, random),
  so the ServerApp draws the same random numbers as when its clients run in other processes.

Clients run one after the other, in the order the messages were pushed; a sweep gets its
parallelism from worker processes (``simulations.pool``), each running whole cells.

Node ids are 64-bit values like the ones a SuperLink draws, but drawn from the run's seed
(:func:`node_ids_for`) and handed to partitions in ascending order: partition ``i`` holds the
``i``-th smallest id. Phalanx's strategy orders replies by node id, and a sum over the rows of an
update stack (the mean, ALIE's honest mean and deviation...) rounds differently in another order;
with seeded ids a rerun is bit for bit the same run, and a resumed run keeps its clients' ids and
with them their reputation. The harness gives the Ray engine's random ids the same ascending
partition order, so both engines stack the rows in the same order.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import ERROR
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import log
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_id, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Mixed into the seed of the node-id draws, so they are a stream of their own.
_NODE_ID_STREAM = 0x6E6F6465  # "node"


def node_ids_for(num_nodes: int, seed: int) -> list[int]:
    """The node ids of a run: ``num_nodes`` distinct 64-bit ids drawn from ``seed``, ascending.

    Like a SuperLink's ids they are uniform over the unsigned 64-bit range, never 0 and never
    the SuperLink's own id, so no code can take an id for a partition number.

    Parameters
    ----------
    num_nodes : int
        How many nodes (>= 1).
    seed : int
        The run's seed.

    Returns
    -------
    list of int
        Ascending ids; partition ``i`` gets ``ids[i]``.

    Raises
    ------
    ValueError
        If ``num_nodes`` < 1.
    """
    if num_nodes < 1:
        raise ValueError(f"node_ids_for: num_nodes must be >= 1, got {num_nodes}")
    rng = np.random.default_rng([_NODE_ID_STREAM, int(seed) & (2**64 - 1)])
    ids: set[int] = set()
    while len(ids) < num_nodes:
        drawn = int(rng.integers(0, 2**64, dtype=np.uint64))
        if drawn not in (0, SUPERLINK_NODE_ID):
            ids.add(drawn)
    return sorted(ids)


@dataclass
class WireStats:
    """What crossing the wire cost: messages, bytes (every object once per crossing) and seconds."""

    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain numbers, for a summary or a benchmark."""
        return {"messages": self.messages, "bytes": self.bytes, "seconds": self.seconds}


@dataclass(frozen=True)
class WireMessage:
    """A message as it travels: its id and the deflated bytes of it and every nested object.

    Attributes
    ----------
    message_id : str
        The message's object id (the SHA-256 of its deflated content), as Flower's grids set it.
    contents : dict
        Object id -> deflated object, children before parents (``get_all_nested_objects``).
    """

    message_id: str
    contents: dict[str, bytes]

    @property
    def size(self) -> int:
        """Bytes on the wire (every object once)."""
        return sum(len(content) for content in self.contents.values())


def send(message: Message, stats: WireStats | None = None) -> WireMessage:
    """Deflate ``message`` to what a sender pushes (flwr 1.42); set its message id as Flower does.

    What happens to ``message`` afterwards no longer changes what was sent.
    """
    started = time.perf_counter()
    with no_object_id_recompute():
        message_id = message.object_id
        message.metadata.__dict__["_message_id"] = message_id
        contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    sent = WireMessage(message_id, contents)
    if stats is not None:
        stats.messages += 1
        stats.bytes += sent.size
        stats.seconds += time.perf_counter() - started
    return sent


def receive(sent: WireMessage, stats: WireStats | None = None) -> Message:
    """The message a receiver inflates from ``sent``: hashes checked, message id set.

    Raises
    ------
    ValueError
        If an object's content does not hash to its id (what the SuperLink's object store
        refuses), or the objects do not inflate to a Message.
    """
    started = time.perf_counter()
    for object_id, content in sent.contents.items():
        if get_object_id(content) != object_id:
            raise ValueError(f"object {object_id} does not hash to its id: its content changed on the way")
    received = inflate_object_from_contents(sent.message_id, sent.contents, keep_object_contents=True)
    if not isinstance(received, Message):
        raise ValueError(f"object {sent.message_id} inflated to a {type(received).__name__}, not a Message")
    received.metadata.__dict__["_message_id"] = sent.message_id
    if stats is not None:
        stats.seconds += time.perf_counter() - started
    return received


def through_the_wire(message: Message, stats: WireStats | None = None) -> Message:
    """``receive(send(message))``: a new message sharing nothing with ``message``.

    The sender deflates the message and every nested object (RecordDict, ArrayRecord, Array
    chunks...), as ``HttpGrid`` and ``flwr-clientapp`` push them; the receiver checks each
    object's SHA-256 id and inflates the message (``inflate_object_from_contents``).
    """
    return receive(send(message, stats), stats)


@contextlib.contextmanager
def separate_global_rng() -> Iterator[None]:
    """Run the block with the caller's torch, numpy and random global RNG states restored afterwards.

    A client in its own process cannot advance the server's global random streams; here it runs
    in the server's process, so the server's states are put back after each client.
    """
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def _node_identity(node_id: int) -> Iterator[None]:
    """TaskIdentity names the client's node while its ClientApp runs (as in a SuperNode's process)."""
    previous = TaskIdentity._node_id  # pylint: disable=protected-access
    TaskIdentity.node_id = node_id
    try:
        yield
    finally:
        TaskIdentity._node_id = previous  # pylint: disable=protected-access


#: Called after each reply reaches the server: (instruction, reply, position in its batch, batch size).
ReplyCallback = Callable[[Message, Message, int, int], None]


@dataclass
class _Node:
    node_id: int
    partition_id: int
    # The serialised state of the node's Context, as a SuperNode stores it between runs of its
    # ClientApp (the rest of the Context, node config and run config, never changes in a run).
    state: bytes
    run_id: int = 0


@dataclass
class _Pending:
    message: Message  # the server's object, for the progress callback
    sent: WireMessage | None  # what was pushed (None with wire=False)
    batch: list[str] = field(default_factory=list)


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are the ClientApp object, called in this process.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The ClientApp every node runs.
    node_ids : list of int
        One id per node; node ``node_ids[i]`` holds partition ``i`` of ``len(node_ids)``.
    run_config : dict
        The run config every node's Context carries (the fused ``[tool.flwr.app.config]``).
    wire : bool
        Send every message through Flower's wire form: deflated when pushed (:func:`send`),
        inflated when delivered (:func:`receive`). Off only to measure what that costs.
    on_reply : callable or None
        ``on_reply(instruction, reply, index, batch_size)`` after each reply (progress).

    Attributes
    ----------
    simulation : bool
        True: a simulation engine, not a deployment; Phalanx's ServerApp allows simulated attacks
        only on a grid that says so (or on Flower's InMemoryGrid).
    stats : WireStats
        The cost of the wire form so far.
    client_seconds : float
        Seconds spent inside the ClientApp.
    """

    simulation = True

    def __init__(self, client_app: ClientApp, node_ids: list[int], run_config: dict[str, Any], *, wire: bool = True,
                 on_reply: ReplyCallback | None = None) -> None:
        if len(set(node_ids)) != len(node_ids) or any(n in (0, SUPERLINK_NODE_ID) for n in node_ids):
            raise ValueError(f"InProcessGrid: node ids must be distinct and neither 0 nor {SUPERLINK_NODE_ID}")
        self._run: Run | None = None
        self._client_app = client_app
        self._run_config = dict(run_config)
        self._nodes = {node_id: _Node(node_id, partition, b"") for partition, node_id in enumerate(node_ids)}
        self._num_partitions = len(node_ids)
        self._pending: dict[str, _Pending] = {}  # instruction id -> instruction not yet delivered
        self._replies: dict[str, Message] = {}  # instruction id -> reply not yet pulled
        self.wire = wire
        self.on_reply = on_reply
        self.stats = WireStats()
        self.client_seconds = 0.0

    # ------------------------------------------------------------------ the Grid API

    def set_run(self, run: Run) -> None:
        """Set the run; every node gets a fresh Context for it."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for node in self._nodes.values():
            node.run_id, node.state = run.run_id, recorddict_to_proto(RecordDict()).SerializeToString()

    @property
    def run(self) -> Run:
        """The run (a copy)."""
        if self._run is None:
            raise RuntimeError("InProcessGrid: set_run was not called")
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A new instruction message (deprecated in Flower: build a ``Message`` instead)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The node ids, in partition order."""
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue instructions for their nodes; return the ids of those accepted.

        An instruction is refused with a logged error, as by a SuperLink, when it is not a valid
        instruction (``flwr.server.utils.validator``), belongs to another run, or names an
        unknown node.
        """
        run_id = self.run.run_id
        accepted: list[str] = []
        for message in messages:
            if self.wire:
                sent = send(message, self.stats)  # the bytes the SuperLink would store, as of now
            else:
                sent = None
                with no_object_id_recompute():
                    message.metadata.__dict__["_message_id"] = message.object_id
            problems = validate_message(message, is_reply_message=False)
            if message.metadata.run_id != run_id:
                problems.append(f"run id {message.metadata.run_id} is not this run's ({run_id})")
            if message.metadata.dst_node_id not in self._nodes:
                problems.append(f"destination node {message.metadata.dst_node_id} is not a node of this grid")
            if problems:
                log(ERROR, "InProcessGrid: message to node %s refused: %s", message.metadata.dst_node_id,
                    "; ".join(problems))
                continue
            self._pending[message.metadata.message_id] = _Pending(message, sent)
            accepted.append(message.metadata.message_id)
        for message_id in accepted:
            self._pending[message_id].batch = accepted
        return accepted

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Deliver the pending instructions among ``message_ids``, then return their replies."""
        wanted = list(dict.fromkeys(message_ids))
        for message_id in wanted:
            if message_id in self._pending:
                self._deliver(message_id)
        return [self._replies.pop(message_id) for message_id in wanted if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push the instructions, run each node's ClientApp in turn, return the replies.

        With ``timeout``, the nodes not reached when it has passed get no turn: their replies are
        missing, as replies arriving after the timeout are missing from Flower's grids.
        """
        message_ids = self.push_messages(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        for message_id in message_ids:
            if deadline is not None and time.monotonic() >= deadline:
                break
            replies.extend(self.pull_messages([message_id]))
        return replies

    # ------------------------------------------------------------------ delivery

    def _deliver(self, message_id: str) -> None:
        pending = self._pending.pop(message_id)
        instruction = pending.message
        received = receive(pending.sent, self.stats) if pending.sent is not None else instruction
        reply = self._reply_to(received)
        if reply is None:
            return
        self._replies[message_id] = reply
        if self.on_reply is not None:
            self.on_reply(instruction, reply, pending.batch.index(message_id), len(pending.batch))

    def _reply_to(self, received: Message) -> Message | None:
        """Run the node's ClientApp on ``received``, its copy of the instruction; the reply as the server gets it."""
        metadata = received.metadata
        if metadata.created_at + metadata.ttl < time.time():
            # Imported here: the link state's module pulls in SQLAlchemy and Alembic (0.8 s).
            from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message

            return create_message_error_unavailable_ins_message(metadata.message_id, metadata.run_id)
        node = self._nodes[metadata.dst_node_id]
        context = Context(run_id=node.run_id, node_id=node.node_id,
                          node_config={PARTITION_ID_KEY: node.partition_id, NUM_PARTITIONS_KEY: self._num_partitions},
                          state=recorddict_from_proto(ProtoRecordDict.FromString(node.state)),
                          run_config=dict(self._run_config))
        started = time.perf_counter()
        try:
            with separate_global_rng(), _node_identity(node.node_id):
                reply = self._client_app(message=received, context=context)
            if not isinstance(reply, Message):
                raise TypeError(f"the ClientApp returned a {type(reply).__name__}, not a Message")
            if dict(context.run_config) != self._run_config:
                raise ValueError(f"The `run_config` field of the `Context` object cannot be modified "
                                 f"(run_id: {metadata.run_id}).")
            node.state = recorddict_to_proto(context.state).SerializeToString()
        except Exception as exc:  # a failing client is an error reply, never the server's exception
            log(ERROR, "ClientApp of node %s raised %s: %s", node.node_id, type(exc).__name__, exc, exc_info=exc)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"),
                            reply_to=received)
        finally:
            self.client_seconds += time.perf_counter() - started
        if self.wire:
            sent = send(reply, self.stats)
        else:
            sent = None
            with no_object_id_recompute():
                reply.metadata.__dict__["_message_id"] = reply.object_id
        problems = validate_message(reply, is_reply_message=True)
        if reply.metadata.reply_to_message_id != metadata.message_id:
            problems.append(f"it replies to {reply.metadata.reply_to_message_id!r}, not to {metadata.message_id!r}")
        if reply.metadata.src_node_id != node.node_id:
            problems.append(f"its source node {reply.metadata.src_node_id} is not {node.node_id}")
        if problems:
            log(ERROR, "InProcessGrid: reply of node %s dropped: %s", node.node_id, "; ".join(problems))
            return None
        return receive(sent, self.stats) if sent is not None else reply


def run_inprocess(server_app: Any, client_app: ClientApp, run_config: dict[str, Any], *, num_nodes: int, seed: int,
                  app_dir: str, override_config: dict[str, Any] | None = None, wire: bool = True,
                  on_reply: ReplyCallback | None = None) -> InProcessGrid:
    """Run ``server_app`` against ``num_nodes`` nodes of ``client_app`` on an :class:`InProcessGrid`.

    The ServerApp is called the way ``flwr-simulation`` calls it (``flwr.server.run_serverapp.run``
    with the grid and the server's Context), in this thread; an exception it raises propagates.

    Parameters
    ----------
    server_app : flwr.serverapp.ServerApp
    client_app : flwr.clientapp.ClientApp
    run_config : dict
        The fused run config (defaults and overrides).
    num_nodes : int
        Nodes (partitions).
    seed : int
        Seeds the node ids (:func:`node_ids_for`).
    app_dir : str
        The Flower App's directory.
    override_config : dict or None
        The overrides alone, recorded on the ``Run``.
    wire, on_reply
        As for :class:`InProcessGrid`.

    Returns
    -------
    InProcessGrid
        The grid, with its ``stats`` and ``client_seconds``.
    """
    import secrets

    from flwr.server.run_serverapp import run as run_serverapp
    from flwr.supercore.constant import NOOP_FEDERATION_ID

    run_id = secrets.randbits(63)  # a run is an event of its own: random, as Flower draws it
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(override_config or {})
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    grid = InProcessGrid(client_app, node_ids_for(num_nodes, seed), run_config, wire=wire, on_reply=on_reply)
    grid.set_run(run)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # pylint: disable=protected-access
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        run_serverapp(grid=grid, context=context, server_app_dir=app_dir, loaded_server_app=server_app)
    finally:
        # pylint: disable-next=protected-access
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
    return grid
