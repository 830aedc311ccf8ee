"""The Flower engine: a ServerApp and a ClientApp that are thin adapters over the shared code.

Nothing here decides anything about FedMOA. The ServerApp drives the embedded
engine's server half (``FederatedServer``, evaluation, ``metrics.jsonl`` records,
checkpoints, final adapters) through :class:`FedMOAStrategy`; the ClientApp calls
:func:`~fedmoa.federation.client.run_client_round`. This module only moves
adapters, replies and client state in and out of Flower's records:

* server → client (``train``): the start adapter (LoRA tensors only) as an
  ``ArrayRecord`` and a ``ConfigRecord`` with the round and the client's index;
* client → server: ``Δθ`` as an ``ArrayRecord``, a ``MetricRecord`` whose keys are
  the same on every client (:data:`METRIC_KEYS`) and a ``ConfigRecord`` with the
  task and the per-objective details, whose keys differ between clients;
* the client's weighting and prompt-sampler state stays in ``context.state``.

Client ``i`` of the experiment file runs on the SuperNode whose ``node_config``
has ``partition-id = i``: the ServerApp asks every node for it once (a ``query``
message), so the mapping does not depend on node ids or on the order in which
nodes connected. The experiment file and the run directory reach both apps
through the run config (:data:`EXPERIMENT_KEY`, :data:`RUN_DIR_KEY`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    UserConfigValue,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedmoa.aggregation import Adapter, ClientUpdate
from fedmoa.errors import ConfigError, FedMOAError, one_line
from fedmoa.federation.client import TRANSPORT_DTYPES, objective_metrics, run_client_round
from fedmoa.federation.config import ExperimentConfig, load_experiment
from fedmoa.federation.embedded import (
    EmbeddedFederation,
    PendingRound,
    client_record,
    failed_client_record,
)
from fedmoa.federation.evaluation import EVAL_KINDS, aggregate_evaluation, evaluate_client
from fedmoa.federation.node import (
    NodeClient,
    client_from_experiment,
    client_from_file,
    client_inputs,
    identity,
    node_policy,
    settings_from_json,
    shared_settings,
)
from fedmoa.federation.roster import RosterEntry, admit, expected_clients, in_order
from fedmoa.federation.server import RoundPlan
from fedmoa.models import resolve_device
from fedmoa.runs import RunDirectory

logger = logging.getLogger(__name__)

# Run config keys (``[tool.flwr.app.config]`` in examples/flower_app/pyproject.toml).
EXPERIMENT_KEY = "experiment"  # absolute path of the experiment TOML
RUN_DIR_KEY = "run-dir"  # absolute path of the run directory; "" = the experiment's output_dir
REPLY_TIMEOUT_KEY = "reply-timeout"  # seconds the server waits for a round's replies
NODE_TIMEOUT_KEY = "node-timeout"  # seconds the server waits for enough SuperNodes

# Record names in messages.
ADAPTER = "adapter"  # ArrayRecord: start adapter (down) or Δθ (up)
ROUND_CONFIG = "config"  # ConfigRecord: server-round, client-id
METRICS = "metrics"  # MetricRecord: METRIC_KEYS
DETAILS = "details"  # ConfigRecord: client-id, task, seconds, per-objective metrics
IDENTITY = "identity"  # ConfigRecord: the node's client (reply to the discovery query)
SETTINGS = "settings"  # ConfigRecord: the experiment without its clients, as JSON (down)

# Node config keys (``flower-supernode --node-config``).
CLIENT_CONFIG_KEY = "client-config"  # path of the node's own client file
PARTITION_ID = "partition-id"  # or: client i of the experiment file (the one-file form)

METRIC_KEYS = (
    "num-examples",
    "accuracy",
    "validation_size",
    "reward",
    "reward/primary",
    "reward/aux_mean",
    "weight/primary",
    "loss",
    "step_time",
    "bytes_down",
    "bytes_up",
)
"""The MetricRecord keys of every reply, whatever the client's objectives are called."""

FLOWER_ENV = {
    # Without it Flower builds a fresh environment per run with uv (and downloads CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

RoundCallback = Callable[[int, list[dict[str, Any]]], None]


# -- adapters and client state as records ---------------------------------------------


def _to_array(tensor: torch.Tensor) -> Array:
    """numpy has no bfloat16: widen it to float32, which is exact (and undone on the way in)."""
    return Array(_wire_array(tensor, "float32"))


PACKED = "fedmoa/packed/"  # + numpy dtype: every LoRA tensor of that dtype, flattened, in order
LAYOUT = "fedmoa/layout"  # uint8 JSON: [name, dtype, shape, offset] per tensor


def _wire_array(tensor: torch.Tensor, transport_dtype: str) -> np.ndarray:
    """A tensor as it travels: in ``transport_dtype`` when that is one of
    :data:`TRANSPORT_DTYPES` (bfloat16 as its 16-bit patterns in int16: numpy has none), else
    as it is (bfloat16 widened to float32, which is exact)."""
    tensor = tensor.detach().cpu()
    wire = TRANSPORT_DTYPES.get(transport_dtype)
    if wire is None:
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    cast = tensor.to(wire)
    return (cast.view(torch.int16) if wire == torch.bfloat16 else cast).numpy()


def adapter_to_record(
    adapter: Mapping[str, torch.Tensor], transport_dtype: str = "float32"
) -> ArrayRecord:
    """The LoRA tensors (PEFT state-dict names) as an ArrayRecord; nothing else travels.

    Packed: one flat array per dtype plus the layout, not one array per tensor. A deployment
    moves every array as objects of its own over HTTP (a LoRA has hundreds of tensors), so
    the cost of a message is per object, not per byte. The values are the same bits.
    """
    flat: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    layout = []
    for name, tensor in adapter.items():
        array = _wire_array(tensor, transport_dtype)
        kind = str(array.dtype)
        layout.append([name, kind, list(array.shape), sizes.get(kind, 0)])
        flat.setdefault(kind, []).append(array.reshape(-1))
        sizes[kind] = sizes.get(kind, 0) + array.size
    arrays = {PACKED + kind: Array(np.concatenate(parts)) for kind, parts in flat.items()}
    arrays[LAYOUT] = Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))
    return ArrayRecord(arrays)


def _unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of a packed record, as they travelled; a bad layout is a ``FedMOAError``."""
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes())
        buffers = {
            key[len(PACKED) :]: record[key].numpy() for key in record if key.startswith(PACKED)
        }
        tensors = {}
        for name, kind, shape, offset in layout:
            size = math.prod(shape)
            part = buffers[kind][offset : offset + size]
            if part.size != size:
                raise ValueError(f"{name}: {part.size} values for shape {shape}")
            tensors[str(name)] = torch.from_numpy(part.reshape(shape).copy())
        return tensors
    except (KeyError, TypeError, ValueError) as err:
        raise FedMOAError(f"the adapter record's layout does not fit its arrays: {err}") from None


def record_to_adapter(
    record: ArrayRecord, like: Adapter | None = None, transport_dtype: str = "float32"
) -> Adapter:
    """The inverse of :func:`adapter_to_record` (an ArrayRecord of one array per tensor is read
    too); tensors that ``like`` holds in bfloat16, and tensors that came in the transport
    dtype, come back in ``like``'s dtype. Wrong keys, shapes or dtypes are left for
    ``sanitize`` to reject."""
    wire = TRANSPORT_DTYPES.get(transport_dtype)
    if LAYOUT in record:
        received = _unpack(record)
    else:
        received = {name: torch.from_numpy(array.numpy()) for name, array in record.items()}
    adapter = {}
    for name, tensor in received.items():
        if wire == torch.bfloat16 and tensor.dtype == torch.int16:
            tensor = tensor.view(torch.bfloat16)
        own = like[name].dtype if like is not None and name in like else None
        # Only what this transport sends is cast (bfloat16 travels as float32 by default);
        # any other dtype stays as it came, for ``sanitize`` to reject.
        if own is not None and (
            tensor.dtype == wire or (own == torch.bfloat16 and tensor.dtype == torch.float32)
        ):
            tensor = tensor.to(own)
        adapter[name] = tensor
    return adapter


def state_to_records(
    state: Mapping[str, Any], prefix: str
) -> dict[str, ArrayRecord | ConfigRecord]:
    """Flatten a client state (nested dicts) into records for ``context.state``.

    Tensors go to ``{prefix}.arrays`` (bfloat16 ones as float32); numbers, strings
    and booleans to ``{prefix}.scalars`` as they are; every other leaf (lists,
    tuples, ``None``, empty dicts: e.g. a ``random.Random`` state) to
    ``{prefix}.json`` as JSON, which round-trips Python ints and floats exactly.
    Tuples come back as lists.
    """
    arrays: dict[str, Array] = {}
    scalars: dict[str, Any] = {}
    encoded: dict[str, Any] = {}
    for path, value in _flatten(state):
        if isinstance(value, torch.Tensor):
            arrays[path] = _to_array(value)
        elif isinstance(value, bool | int | float | str):
            scalars[path] = value
        else:
            encoded[path] = json.dumps(value)
    return {
        f"{prefix}.arrays": ArrayRecord(arrays),
        f"{prefix}.scalars": ConfigRecord(scalars),
        f"{prefix}.json": ConfigRecord(encoded),
    }


def records_to_state(records: RecordDict, prefix: str) -> dict[str, Any] | None:
    """The inverse of :func:`state_to_records`; ``None`` when ``records`` holds no state."""
    if f"{prefix}.scalars" not in records:
        return None
    leaves: list[tuple[str, Any]] = []
    leaves += [(k, torch.from_numpy(a.numpy())) for k, a in records[f"{prefix}.arrays"].items()]
    leaves += list(records[f"{prefix}.scalars"].items())
    leaves += [(k, json.loads(v)) for k, v in records[f"{prefix}.json"].items()]
    state: dict[str, Any] = {}
    for path, value in leaves:
        *parents, leaf = path.split("/")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return state


def _flatten(tree: Mapping[str, Any], parent: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if "/" in key:
            raise ValueError(f"client state key {key!r} contains '/', the path separator")
        path = f"{parent}/{key}" if parent else key
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, path)
        else:
            yield path, dict(value) if isinstance(value, Mapping) else value


# -- run config -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """What the apps read from Flower's run config."""

    experiment: Path
    run_dir: Path
    reply_timeout: float = 3600.0
    node_timeout: float = 300.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, UserConfigValue]) -> RunSettings:
        """Absolute paths only: the ServerApp and ClientApps do not run in the user's cwd."""
        raw = str(run_config.get(EXPERIMENT_KEY) or "")
        experiment = Path(raw).expanduser()
        if not raw or not experiment.is_absolute():
            raise FedMOAError(
                f"the run config needs {EXPERIMENT_KEY!r}, the absolute path of the experiment "
                f"TOML (got {raw!r}): --run-config \"{EXPERIMENT_KEY}='/abs/experiment.toml'\""
            )
        raw_run_dir = str(run_config.get(RUN_DIR_KEY) or "")
        if raw_run_dir:
            run_dir = Path(raw_run_dir).expanduser()
            if not run_dir.is_absolute():
                raise FedMOAError(
                    f"the run config's {RUN_DIR_KEY!r} must be an absolute path (got "
                    f"{raw_run_dir!r}): the ServerApp does not run in the user's cwd"
                )
        else:  # the experiment's output_dir, relative to the experiment file
            run_dir = experiment.parent / load_experiment(experiment).output_dir
        return cls(
            experiment,
            run_dir,
            float(run_config.get(REPLY_TIMEOUT_KEY, cls.reply_timeout)),
            float(run_config.get(NODE_TIMEOUT_KEY, cls.node_timeout)),
        )


# -- ServerApp ---------------------------------------------------------------------------


class FedMOAStrategy(Strategy):
    """Flower's strategy contract over the embedded engine's server half.

    ``configure_train`` sends each client of ``FederatedServer.configure_round``
    its start adapter; ``aggregate_train`` turns the replies into ``ClientUpdate``
    objects and hands them, with the client records, to
    ``EmbeddedFederation.aggregate_replies``. On evaluation rounds
    ``configure_evaluate`` sends every client the adapters it scores (global,
    personalized, its local model) and each ClientApp scores them on its own test
    rows (:func:`evaluate`); ``aggregate_evaluate`` combines the metrics-only
    replies (``aggregate_evaluation``, as the embedded engine does), then the round
    is logged and checkpointed (``EmbeddedFederation.finish_round``).
    """

    def __init__(
        self,
        federation: EmbeddedFederation,
        roster: Mapping[str, RosterEntry],
        *,
        reply_timeout: float | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.federation = federation
        self.roster = dict(roster)  # the clients that joined (discover_clients)
        self.reply_timeout = reply_timeout  # only for the log: Strategy.start applies it
        self.on_round = on_round
        self.nodes = {cid: entry.node_id for cid, entry in roster.items()}
        self.settings = shared_settings(federation.cfg)  # sent with every message
        self.plan: RoundPlan | None = None
        self.pending: PendingRound | None = None  # aggregated, waiting for its evaluation
        self.evaluate_sent = 0.0  # perf_counter when the evaluate messages went out

    def summary(self) -> None:
        """Logged by ``Strategy.start`` on Flower's logger, next to Flower's own lines."""
        cfg = self.federation.cfg
        logging.getLogger("flwr").info(
            "FedMOA strategy: method %s, %d clients, %d rounds, run directory %s",
            cfg.server.method,
            len(self.roster),
            cfg.server.rounds,
            self.federation.run.path,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client the server samples, to the node of its partition."""
        del arrays, config  # the FederatedServer's state is the source of truth
        self.plan = self.federation.server.configure_round(server_round)
        transport = self.federation.cfg.server.transport_dtype
        messages = []
        for client_id, start in self.plan.starts.items():
            content = RecordDict(
                {
                    ADAPTER: adapter_to_record(start, transport),
                    ROUND_CONFIG: ConfigRecord(
                        {"server-round": server_round, "client-id": client_id}
                    ),
                    SETTINGS: ConfigRecord({"experiment": self.settings}),
                }
            )
            messages.append(
                Message(
                    content=content,
                    dst_node_id=self.nodes[client_id],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies → ``ClientUpdate``s, in the plan's client order; failures are logged and skipped."""
        plan = self.plan
        if plan is None or plan.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train")
        client_of_node = {node: cid for cid, node in self.nodes.items()}
        by_client = {client_of_node.get(r.metadata.src_node_id): r for r in replies}
        reference = self.federation.server.state.global_adapter
        updates: list[ClientUpdate] = []
        records: list[dict[str, Any]] = []
        for client_id in plan.starts:
            reply = by_client.get(client_id)
            try:
                if reply is None:  # hung, too slow or disconnected
                    within = f" ({self.reply_timeout:g}s)" if self.reply_timeout else ""
                    raise FedMOAError(f"no reply within the round timeout{within}")
                if reply.has_error():
                    raise FedMOAError(f"error reply: {reply.error.reason}")
                update, record = _reply_to_update(
                    server_round,
                    client_id,
                    reply,
                    reference,
                    self.federation.cfg.server.transport_dtype,
                )
            except Exception as err:  # one client failing fails the round for itself only
                named = f"{type(err).__name__}: {err}"
                # one line: a Ray error reply spans several
                reason = one_line(err if isinstance(err, FedMOAError) else named)
                logger.warning("round %d: client %r failed: %s", server_round, client_id, reason)
                records.append(failed_client_record(server_round, client_id, reason))
                continue
            updates.append(update)
            records.append(record)
        self.pending = self.federation.aggregate_replies(plan, updates, records)
        metrics = MetricRecord({"replies": len(updates)})
        return adapter_to_record(self.federation.server.state.global_adapter), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On an evaluation round, one message per client with the adapters it scores."""
        del arrays, config
        pending = self.pending
        if pending is None or pending.server_round != server_round or not pending.evaluate:
            return []
        self.evaluate_sent = time.perf_counter()
        return self.evaluate_messages(server_round, pending.local_models)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Combine the clients' scores, then log and checkpoint the round."""
        pending = self.pending
        if pending is None or pending.server_round != server_round:
            raise RuntimeError(f"aggregate_evaluate({server_round}) without aggregate_train")
        metrics = None
        if pending.evaluate:
            metrics = self.combine_scores(server_round, replies)
            pending.timer.seconds["evaluate"] = time.perf_counter() - self.evaluate_sent
        records = self.federation.finish_round(pending, metrics)
        self.pending = None
        if self.on_round is not None:
            self.on_round(server_round, records)
        accuracy = (metrics or {}).get("global/accuracy")
        return MetricRecord({"global/accuracy": float(accuracy)}) if accuracy is not None else None

    def evaluate_round0(self, grid: Grid) -> None:
        """Round 0 (``server.eval_round0``): every client scores the starting adapter."""
        if not self.federation.round0_due():
            return
        replies = grid.send_and_receive(self.evaluate_messages(0, {}), timeout=self.reply_timeout)
        self.federation.log_round0(self.combine_scores(0, replies))

    def evaluate_messages(
        self, server_round: int, local_models: Mapping[str, Adapter]
    ) -> list[Message]:
        messages = []
        for client_id, entry in self.roster.items():
            adapters = self.federation.eval_adapters(client_id, local_models)
            content = RecordDict(
                {
                    **{f"{ADAPTER}/{kind}": adapter_to_record(a) for kind, a in adapters.items()},
                    ROUND_CONFIG: ConfigRecord(
                        {"server-round": server_round, "client-id": client_id}
                    ),
                    SETTINGS: ConfigRecord({"experiment": self.settings}),
                }
            )
            messages.append(
                Message(
                    content=content,
                    dst_node_id=entry.node_id,
                    message_type=MessageType.EVALUATE,
                    group_id=str(server_round),
                )
            )
        return messages

    def combine_scores(self, server_round: int, replies: Iterable[Message]) -> dict[str, float]:
        """The eval record from the clients' metrics-only replies; a failed one is logged and
        left out."""
        client_of_node = {node: cid for cid, node in self.nodes.items()}
        scores: dict[str, dict[str, float]] = {}
        for reply in replies:
            client_id = client_of_node.get(reply.metadata.src_node_id)
            if client_id is None:
                continue
            if reply.has_error():
                logger.warning(
                    "round %d: client %r failed to evaluate: %s",
                    server_round,
                    client_id,
                    one_line(reply.error.reason),
                )
                continue
            scores[client_id] = {k: float(v) for k, v in reply.content[METRICS].items()}
        tasks = {cid: entry.task for cid, entry in self.roster.items()}
        return aggregate_evaluation(scores, tasks)


def discover_clients(
    grid: Grid, cfg: ExperimentConfig, node_timeout: float
) -> dict[str, RosterEntry]:
    """Ask every node that connects which client it runs, until all of the experiment's clients
    joined, or ``node_timeout`` passed and ``server.min_clients`` of them did.

    A node is asked once, with a ``query`` message that carries the shared settings; refused
    nodes (``roster.admit``) are logged with the reason and left out.
    """
    expected = expected_clients(cfg)
    settings = shared_settings(cfg)
    roster: dict[str, RosterEntry] = {}
    refused: list[str] = []
    asked: set[int] = set()
    deadline = time.monotonic() + node_timeout
    while len(roster) < expected:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            asked.update(new)
            messages = [
                Message(
                    content=RecordDict({SETTINGS: ConfigRecord({"experiment": settings})}),
                    dst_node_id=node,
                    message_type=MessageType.QUERY,
                )
                for node in new
            ]
            replies = {
                r.metadata.src_node_id: r
                for r in grid.send_and_receive(messages, timeout=node_timeout)
            }
            for node in new:
                reply = replies.get(node)
                try:
                    if reply is None:
                        raise FedMOAError(f"node {node}: no reply to the query ({node_timeout:g}s)")
                    if reply.has_error():
                        raise FedMOAError(
                            f"node {node}: error reply: {one_line(reply.error.reason)}"
                        )
                    entry = admit(node, dict(reply.content[IDENTITY]), cfg, roster)
                except FedMOAError as err:
                    logger.warning("refused %s", err)
                    refused.append(str(err))
                    continue
                roster[entry.client_id] = entry
            continue
        if time.monotonic() > deadline:
            if len(roster) >= cfg.server.min_clients:
                logger.warning(
                    "%d of %d clients joined within %.0fs; going on without the others",
                    len(roster),
                    expected,
                    node_timeout,
                )
                break
            raise FedMOAError(
                f"{len(roster)} of {expected} clients joined within {node_timeout:.0f}s, fewer "
                f"than server.min_clients = {cfg.server.min_clients}"
                + (f"; refused: {'; '.join(refused)}" if refused else "")
            )
        time.sleep(0.5)
    return in_order(roster, cfg)


def _reply_to_update(
    server_round: int,
    client_id: str,
    reply: Message,
    reference: Adapter,
    transport_dtype: str = "float32",
) -> tuple[ClientUpdate, dict[str, Any]]:
    """A train reply as the ``ClientUpdate`` the aggregators take and its ``metrics.jsonl`` record."""
    content = reply.content
    metrics: dict[str, Any] = dict(content[METRICS])
    details: dict[str, Any] = dict(content[DETAILS])
    if details.pop("client-id") != client_id:
        raise FedMOAError(f"reply names another client, {reply.content[DETAILS]['client-id']!r}")
    update = ClientUpdate(
        client_id=client_id,
        task=str(details.pop("task")),
        # Metrics as sent: missing or bad ones are for ``sanitize`` to reject and log.
        num_examples=metrics.pop("num-examples", None),  # type: ignore[arg-type]
        delta=record_to_adapter(content[ADAPTER], like=reference, transport_dtype=transport_dtype),
        accuracy=metrics.pop("accuracy", None),  # type: ignore[arg-type]
        validation_size=metrics.pop("validation_size", None),  # type: ignore[arg-type]
        metrics={k: v for k, v in metrics.items() if k not in ("bytes_down", "bytes_up")},
    )
    record = client_record(
        server_round,
        update,
        {k: v for k, v in details.items() if k != "seconds"},
        bytes_down=int(metrics.get("bytes_down", 0)),
        bytes_up=int(metrics.get("bytes_up", 0)),
        seconds=float(details.get("seconds", 0.0)),
    )
    return update, record


def serve(grid: Grid, context: Context, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """The ServerApp's body: run every round, then write the final adapters and summary."""
    settings = RunSettings.from_run_config(context.run_config)
    cfg = load_experiment(settings.experiment)
    run = RunDirectory(settings.run_dir)
    run.save_config(settings.experiment, dataclasses.asdict(cfg))
    federation = EmbeddedFederation(cfg, run, load_clients=False)  # no client data here
    roster = discover_clients(grid, cfg, settings.node_timeout)
    federation.admit_clients({cid: entry.task for cid, entry in roster.items()})
    # server.round_timeout, when the experiment sets it, else the run config's reply-timeout:
    # replies that have not come by then (hung, slow or disconnected nodes) are dropped.
    timeout = cfg.server.round_timeout or settings.reply_timeout
    strategy = FedMOAStrategy(federation, roster, reply_timeout=timeout, on_round=on_round)
    strategy.evaluate_round0(grid)
    strategy.start(
        grid,
        adapter_to_record(federation.server.state.global_adapter),
        num_rounds=cfg.server.rounds,
        timeout=timeout,
    )
    return federation.finish()


# -- ClientApp ---------------------------------------------------------------------------


def node_client(message: Message, context: Context) -> NodeClient:
    """This node's client: from its own client file (``client-config`` in its node config,
    under the settings the server sent), else client ``partition-id`` of the experiment file."""
    client_file = str(context.node_config.get(CLIENT_CONFIG_KEY) or "")
    if client_file:
        if SETTINGS not in message.content:
            raise FedMOAError("the message carries no settings: is the ServerApp fedmoa's?")
        cfg = settings_from_json(str(message.content[SETTINGS]["experiment"]))
        return client_from_file(client_file, cfg)
    if PARTITION_ID not in context.node_config:
        raise FedMOAError(
            "this node has no client: start its SuperNode with --node-config "
            f"\"{CLIENT_CONFIG_KEY}='/path/client.toml'\" (or {PARTITION_ID}=I, client I of "
            "the experiment file)"
        )
    settings = RunSettings.from_run_config(context.run_config)
    return client_from_experiment(settings.experiment, context.node_config[PARTITION_ID])


def _named_client(message: Message, context: Context) -> NodeClient:
    """:func:`node_client`, which must be the client the server addressed."""
    node = node_client(message, context)
    asked = str(message.content[ROUND_CONFIG]["client-id"])
    if node.client.id != asked:
        raise FedMOAError(
            f"node {context.node_id} runs client {node.client.id!r} ({node.where}), the server "
            f"asked for {asked!r}"
        )
    return node


def identify(message: Message, context: Context) -> Message:
    """Reply to the server's query with this node's client (``roster.admit`` checks it); a node
    that cannot load its client says why, in one line."""
    try:
        record = identity(node_client(message, context))
    except FedMOAError as err:
        record = {"error": one_line(err)}
    return Message(RecordDict({IDENTITY: ConfigRecord(record)}), reply_to=message)


def train(message: Message, context: Context) -> Message:
    """One client round: the same ``run_client_round`` call as the embedded engine makes.

    ``server.round_timeout`` counts from here on the client (the ServerApp counts from
    sending): past it the round raises ``ClientTimeout``, so a slow node stops working
    on a reply the server has dropped and becomes free for the next message.
    """
    began = time.perf_counter()
    started = time.monotonic()
    node = _named_client(message, context)
    cfg, client = node.cfg, node.client
    model = node_policy(cfg)
    data, reward_funcs = client_inputs(node)
    prefix = f"fedmoa/{client.id}"
    result = run_client_round(
        model.policy,
        model.tokenizer,
        client,
        data,
        reward_funcs,
        record_to_adapter(
            message.content[ADAPTER],
            like=model.initial,
            transport_dtype=cfg.server.transport_dtype,
        ),
        records_to_state(context.state, prefix),
        method=cfg.server.method,
        server=cfg.server,
        weighting_config=cfg.weighting,
        seed=cfg.seed,
        server_round=int(message.content[ROUND_CONFIG]["server-round"]),
        started=started,
    )
    for name, record in state_to_records(result.state, prefix).items():
        context.state[name] = record
    update = result.update
    metrics = MetricRecord(
        {
            "num-examples": update.num_examples,
            "accuracy": update.accuracy,
            "validation_size": update.validation_size,
            **update.metrics,
            "bytes_down": result.bytes_down,
            "bytes_up": result.bytes_up,
        }
    )
    details = ConfigRecord(
        {
            "client-id": client.id,
            "task": client.task,
            "seconds": time.perf_counter() - began,
            **objective_metrics(result.history, [r.name for r in client.rewards]),
        }
    )
    content = RecordDict(
        {
            ADAPTER: adapter_to_record(update.delta, cfg.server.transport_dtype),
            METRICS: metrics,
            DETAILS: details,
        }
    )
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Score the adapters the server sent on this client's own test rows; reply metrics only.

    The same ``evaluate_client`` call the embedded engine makes for each client.
    """
    node = _named_client(message, context)
    model = node_policy(node.cfg)
    data, reward_funcs = client_inputs(node)
    adapters = {
        kind: record_to_adapter(message.content[f"{ADAPTER}/{kind}"], like=model.initial)
        for kind in EVAL_KINDS
        if f"{ADAPTER}/{kind}" in message.content
    }
    metrics = evaluate_client(
        model.policy, model.tokenizer, node.client, data, reward_funcs, adapters, node.cfg.server
    )
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


# -- the apps ------------------------------------------------------------------------------


def _with_run_config(
    handler: Callable[..., Any], run_config: Mapping[str, UserConfigValue] | None
) -> Callable[..., Any]:
    """``handler`` with ``run_config`` merged into ``context.run_config`` first.

    ``flwr.simulation.run_simulation`` has no run-config argument; this is how the
    in-process simulation passes the same keys that ``flwr run --run-config`` would.
    Flower forbids changing ``context.run_config``, so the handler gets a copy of the
    context that shares its ``state`` (what the handler writes there persists).
    """
    if not run_config:
        return handler
    overrides = dict(run_config)

    def wrapped(first: Any, context: Context, *args: Any) -> Any:
        merged = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config={**context.run_config, **overrides},
            series_id=context.series_id,
        )
        return handler(first, merged, *args)

    return wrapped


def build_server_app(
    run_config: Mapping[str, UserConfigValue] | None = None,
    on_round: RoundCallback | None = None,
    on_finish: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`serve`, optionally with run-config overrides and callbacks."""

    def main(grid: Grid, context: Context) -> None:
        summary = serve(grid, context, on_round)
        if on_finish is not None:
            on_finish(summary)

    app = ServerApp()
    app.main()(_with_run_config(main, run_config))
    return app


def build_client_app(run_config: Mapping[str, UserConfigValue] | None = None) -> ClientApp:
    """A ClientApp answering ``train`` (:func:`train`), ``evaluate`` (:func:`evaluate`) and
    ``query`` (:func:`identify`)."""
    app = ClientApp()
    app.train()(_with_run_config(train, run_config))
    app.evaluate()(_with_run_config(evaluate, run_config))
    app.query()(_with_run_config(identify, run_config))
    return app


server_app = build_server_app()
"""The ServerApp for ``flwr run`` (``fedmoa.federation.flower_app:server_app``)."""
client_app = build_client_app()
"""The ClientApp for ``flwr run`` (``fedmoa.federation.flower_app:client_app``)."""


# -- simulation ------------------------------------------------------------------------------


@contextlib.contextmanager
def flower_environment(flwr_home: Path) -> Iterator[None]:
    """Flower's offline settings and ``FLWR_HOME`` for the duration of a run, then restored."""
    values = {**FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Ray resources per SuperNode: one CPU, and a whole GPU when the model runs on CUDA (one
    client per GPU at a time, so two actors never hold two model copies on one device)."""
    on_gpu = resolve_device(cfg.model.device).type == "cuda"
    return {"num_cpus": 1, "num_gpus": 1.0 if on_gpu else 0.0}


def run_simulation(
    experiment: str | Path,
    run_dir: str | Path,
    *,
    on_round: RoundCallback | None = None,
    flwr_home: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run ``experiment`` on Flower's Ray simulation, one virtual SuperNode per client.

    Writes the same run directory as the embedded engine and returns its summary.
    ``FLWR_HOME`` is a temporary folder unless ``flwr_home`` is given.
    """
    from flwr.simulation import run_simulation as flower_run_simulation

    experiment, run_dir = Path(experiment).resolve(), Path(run_dir).resolve()
    cfg = load_experiment(experiment)
    if not cfg.clients:
        raise ConfigError(
            f"{experiment}: clients: the simulation runs the clients the experiment lists, and "
            "it lists none (server.num_clients is for a deployment's own client files)"
        )
    run_config = {EXPERIMENT_KEY: str(experiment), RUN_DIR_KEY: str(run_dir)}
    summaries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        home = (
            Path(flwr_home)
            if flwr_home
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        stack.enter_context(flower_environment(home))
        flower_run_simulation(
            server_app=build_server_app(run_config, on_round, summaries.append),
            client_app=build_client_app(run_config),
            num_supernodes=len(cfg.clients),
            backend_config={"client_resources": client_resources(cfg)},
            verbose_logging=verbose,
        )
    if not summaries:
        raise FedMOAError("the Flower simulation ended before the ServerApp finished; see its log")
    return summaries[0]
