"""Server optimisers on the pseudo-gradient: FedAdam, FedYogi, FedAvgM.

Adaptive Federated Optimization (Reddi et al. 2021) treats the aggregated
client update ``Δ_t`` as a pseudo-gradient and steps a server optimiser on it;
FedAvgM (Hsu et al. 2019) adds server momentum. The baselines ``fedadam``,
``fedyogi`` and ``fedavgm`` use them on top of the FedAvg mean delta, and
``server.server_lr`` scales the step they take (``server_optimizer_aggregate``).

Reuse decision: these classes *drive Flower's own implementations*
(``flwr.serverapp.strategy.FedAdam``/``FedYogi``/``FedAvgM`` of flwr 1.42)
rather than copy their update rules. That works without a running server:

- the update lives in ``aggregate_train(server_round, replies)``, which needs
  only the strategy's ``current_arrays`` and a list of reply ``Message``s; no
  ``Grid`` is touched;
- ``configure_train`` (which needs a ``Grid`` to sample nodes) does nothing for
  the update but store ``current_arrays``; we set that attribute directly to the
  engine's current adapter before every step (a dict of ndarrays for FedOpt
  subclasses, an ``ArrayRecord`` for FedAvgM, exactly what ``configure_train``
  would store);
- we send one reply carrying ``θ_t + Δ_t`` with ``num-examples = 1``, so
  Flower's weighted average returns it unchanged and Flower computes
  ``Δ_t = aggregated - current`` itself;
- the reply is built with an explicit ``flwr.app.Metadata``: the ordinary
  ``Message`` constructor reads the process-wide ``TaskIdentity.run_id``, which
  only a running ServerApp sets, and setting it ourselves would leak global
  state into a real Flower run in the same process;
- the optimiser state is public on the strategy (``m_t``, ``v_t``;
  ``momentum_vector``), so ``state_dict``/``load_state_dict`` can checkpoint it.

Arrays go through Flower in float64 (adapter dtypes are restored afterwards),
so ``(θ_t + Δ_t) - θ_t`` loses nothing that matters. Hyperparameters left out
take Flower's defaults. Flower's semantics are kept as they are, including
two differences from the paper's Algorithm 2: FedAdam's bias correction uses
``server_round + 1`` as the exponent, and FedYogi/FedAdam start ``v`` at 0
rather than ``τ²``. Each step logs Flower's one INFO line
("aggregate_train: Received 1 results and 0 failures").
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from fedmoa.aggregation.fedavg import fedavg_aggregate
from fedmoa.aggregation.updates import (
    Adapter,
    AggregationResult,
    ClientUpdate,
    apply_delta,
    check_positive,
    weighted_sum,
)
from fedmoa.errors import ConfigError

ServerOptimizerName = Literal["fedadam", "fedyogi", "fedavgm"]

_STRATEGIES: dict[str, type[FedOpt] | type[FedAvgM]] = {
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
}
_FEDOPT_PARAMS = ("eta", "eta_l", "beta_1", "beta_2", "tau")
_FEDAVGM_PARAMS = ("server_learning_rate", "server_momentum")
_UNIT_INTERVAL_PARAMS = ("beta_1", "beta_2", "server_momentum")  # in [0, 1)
_WEIGHT_KEY = "num-examples"  # Flower's default ``weighted_by_key``
_REPLY_TTL_S = 43200.0  # Flower's default message TTL; nothing checks it here


class ServerOptimizer(Protocol):
    """A stateful server update rule on the aggregated client delta."""

    def step(self, current: Adapter, mean_delta: Adapter) -> Adapter:
        """Return the new global adapter θ_{t+1} from θ_t and the pseudo-gradient source Δ_t."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (round counter and moment buffers)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        ...


def make_server_optimizer(name: ServerOptimizerName, **params: float) -> ServerOptimizer:
    """A server optimiser by baseline name; ``params`` are Flower's hyperparameter names.

    fedadam/fedyogi take ``eta, eta_l, beta_1, beta_2, tau`` (``eta_l`` is the
    client lr and unused by the server rule); fedavgm takes
    ``server_learning_rate, server_momentum``.
    """
    return FlowerServerOptimizer(name, **params)


def check_server_optimizer(name: str, params: Mapping[str, object]) -> None:
    """A one-line ``ConfigError`` unless ``params`` are valid settings of optimiser ``name``
    (the config checks ``server.server_optimizer`` with it before any run starts)."""
    if name not in _STRATEGIES:
        raise ConfigError(
            f"server optimizer must be one of {', '.join(get_args(ServerOptimizerName))}, "
            f"got {name!r}"
        )
    allowed = _FEDAVGM_PARAMS if name == "fedavgm" else _FEDOPT_PARAMS
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name} does not take {', '.join(unknown)} (it takes {', '.join(allowed)})"
        )
    for key, value in params.items():
        if key in _UNIT_INTERVAL_PARAMS:
            if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
                raise ConfigError(f"{name}.{key} must be in [0, 1), got {value!r}")
        else:
            check_positive(f"{name}.{key}", value)


def server_optimizer_aggregate(
    current: Adapter,
    updates: Iterable[ClientUpdate],
    optimizer: ServerOptimizer,
    server_lr: float = 1.0,
    robust_norm: float | None = None,
) -> AggregationResult:
    """One round of a server-optimiser baseline: FedAvg's mean delta steps ``optimizer``, and
    ``θ_{t+1} = θ_t + η_s·(step(θ_t, Δ_t) − θ_t)``.

    ``server_lr`` (η_s) scales the optimiser's step as it scales FedAvg's, and the task
    adapters are ``θ_t + η_s·Δ_τ`` as under FedAvg (``fedavg_aggregate``), so the global and
    task adapters move by the same factor under every method. Neither Adam's moments nor
    FedAvgM's momentum depend on the step taken, so η_s acts as ``eta·η_s`` (FedAdam, FedYogi)
    or ``server_learning_rate·η_s`` (FedAvgM). At η_s = 1 the optimiser's adapter is kept as
    it is (bit for bit).
    """
    result = fedavg_aggregate(current, updates, server_lr, robust_norm)
    if not result.global_delta:  # nothing accepted: the adapter stays, the optimiser too
        return result
    stepped = optimizer.step(current, result.global_delta)
    if server_lr != 1.0:
        step = weighted_sum([stepped, current], [1.0, -1.0], current)
        stepped = apply_delta(current, step, server_lr)
    result.global_adapter = stepped
    return result


class FlowerServerOptimizer:
    """Runs one of Flower's server-optimiser strategies on adapters (see module docstring)."""

    def __init__(self, name: ServerOptimizerName, **params: float) -> None:
        check_server_optimizer(name, params)
        self.name: ServerOptimizerName = name
        self._strategy = _STRATEGIES[name](**params)
        self._round = 0
        self._keys: list[str] = []  # adapter keys in the order Flower's lists follow

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The values in effect, Flower's defaults included (for run reports)."""
        allowed = _FEDAVGM_PARAMS if self.name == "fedavgm" else _FEDOPT_PARAMS
        return {key: float(getattr(self._strategy, key)) for key in allowed}

    def step(self, current: Adapter, mean_delta: Adapter) -> Adapter:
        """θ_{t+1} from Flower's ``aggregate_train`` on one reply carrying θ_t + Δ_t."""
        if current.keys() != mean_delta.keys() or any(
            mean_delta[k].shape != t.shape for k, t in current.items()
        ):  # numpy would broadcast a wrong shape silently
            raise ValueError("mean_delta must have exactly the keys and shapes of current")
        self._keys = sorted(current)  # a fixed order: FedAvgM keeps its momentum as a list
        theta = {k: _to_float64(current[k]) for k in self._keys}
        target = {k: theta[k] + _to_float64(mean_delta[k]) for k in self._keys}
        self._round += 1
        if isinstance(self._strategy, FedOpt):
            self._strategy.current_arrays = theta
        else:
            self._strategy.current_arrays = _array_record(theta)
        arrays, _ = self._strategy.aggregate_train(self._round, [_reply(target, self._round)])
        if arrays is None:  # only when Flower saw no valid reply; ours is always valid
            raise RuntimeError(f"Flower's {self.name} returned no arrays")
        return {
            k: torch.tensor(arrays[k].numpy()).to(device=t.device, dtype=t.dtype)
            for k, t in current.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """Round counter and moment buffers as float64 CPU tensors by adapter key."""
        strategy = self._strategy
        if isinstance(strategy, FedOpt):
            buffers = {"m_t": _to_tensors(strategy.m_t), "v_t": _to_tensors(strategy.v_t)}
        else:
            momentum = strategy.momentum_vector
            named = None if momentum is None else dict(zip(self._keys, momentum, strict=True))
            buffers = {"momentum": _to_tensors(named)}
        return {"name": self.name, "round": self._round, **buffers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for {state.get('name')!r}, not {self.name!r}")
        self._round = int(state["round"])
        strategy = self._strategy
        if isinstance(strategy, FedOpt):
            strategy.m_t = _to_arrays(state["m_t"])
            strategy.v_t = _to_arrays(state["v_t"])
        else:
            momentum = _to_arrays(state["momentum"])
            self._keys = sorted(momentum or {})
            strategy.momentum_vector = (
                None if momentum is None else [momentum[k] for k in self._keys]
            )


def _to_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _reply(arrays: Mapping[str, np.ndarray], server_round: int) -> Message:
    """A training reply as a ClientApp would send it, without a running ServerApp."""
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=1,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=_REPLY_TTL_S,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {"arrays": _array_record(arrays), "metrics": MetricRecord({_WEIGHT_KEY: 1})}
    )
    return Message(content, metadata=metadata)


def _to_tensors(arrays: Mapping[str, np.ndarray] | None) -> dict[str, torch.Tensor] | None:
    return None if arrays is None else {k: torch.tensor(v) for k, v in arrays.items()}


def _to_arrays(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, np.ndarray] | None:
    return None if tensors is None else {k: _to_float64(t) for k, t in tensors.items()}
