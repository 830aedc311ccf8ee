"""The wire format: adapters and client replies as Flower records.

* server → client (``train``): the start adapter (LoRA tensors only) as an
  ``ArrayRecord`` and a ``ConfigRecord`` with the round and the client's id;
* client → server: ``Δθ`` as an ``ArrayRecord``, a ``MetricRecord`` whose keys are
  the same on every client (:data:`METRIC_KEYS`) and a ``ConfigRecord`` with the
  task and the per-objective details, whose keys differ between clients.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedmoa.aggregation import Adapter, ClientUpdate
from fedmoa.errors import FedMOAError
from fedmoa.federation.client import TRANSPORT_DTYPES
from fedmoa.federation.runtime import client_record

# Record names in messages.
ADAPTER = "adapter"  # ArrayRecord: start adapter (down) or Δθ (up)
ROUND_CONFIG = "config"  # ConfigRecord: server-round, client-id
METRICS = "metrics"  # MetricRecord: METRIC_KEYS
DETAILS = "details"  # ConfigRecord: client-id, task, seconds, per-objective metrics
PAIRS = "validation-pairs"  # MetricRecord: rows, before, after (the gain rule only; up)
IDENTITY = "identity"  # ConfigRecord: the node's client (reply to the discovery query)
SETTINGS = "settings"  # ConfigRecord: the experiment without its clients, as JSON (down)

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


def pairs_to_record(pairs: Sequence[tuple[int, float, float]]) -> MetricRecord:
    """The gain rule's paired validation scores as three parallel lists."""
    rows, before, after = (list(column) for column in zip(*pairs, strict=True))
    return MetricRecord({"rows": rows, "before": before, "after": after})


def record_to_pairs(record: MetricRecord) -> tuple[tuple[Any, Any, Any], ...]:
    """The inverse of :func:`pairs_to_record`; the values are for ``sanitize`` to check."""
    columns = [record.get(key) for key in ("rows", "before", "after")]
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
        raise FedMOAError("the reply's validation pairs are not three lists of one length")
    return tuple(zip(*columns, strict=True))


def reply_to_update(
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
        validation_pairs=record_to_pairs(content[PAIRS]) if PAIRS in content else (),
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
