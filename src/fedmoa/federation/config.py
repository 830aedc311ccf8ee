"""The experiment file for a federation: heterogeneous clients and one server.

Clients may differ in everything that concerns rewards (which objectives, how
many, on what scale, which one is primary) and in their data and GRPO settings.
A ``[client_defaults]`` table is merged under every ``[[clients]]`` entry so that
shared settings are written once.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from fedmoa.aggregation.server_optimizers import check_server_optimizer
from fedmoa.aggregation.task_accuracy import AccuracyRule, HarmEvidence
from fedmoa.config import (
    OPAQUE_TABLES,
    STRICT,
    CheckConfig,
    Location,
    LoraConfig,
    ModelConfig,
    RewardConfig,
    anchor_paths,
    check_advantage,
    check_rewards,
    check_unique,
    check_weight_floor,
    config_dir,
    field_path,
    given_keys,
    merge_defaults,
    parse_config,
    read_toml,
    report_unread,
)
from fedmoa.data import DataConfig, SplitConfig
from fedmoa.errors import ConfigError
from fedmoa.grpo.trainer import GRPOSettings
from fedmoa.privacy import PrivacyConfig
from fedmoa.weighting.config import WeightingConfig, resolve_method, unread_keys

Method = Literal[
    "fedavg",
    "fedavg-primary",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "local",
    "centralized",
    "fedmoa-hg",
    "fedmoa-taa",
    "fedmoa",
]
# Which client weighting and which server rule each method uses (fedmoa-algorithm.md, "Baselines").
HYPERGRADIENT_METHODS = frozenset({"fedmoa", "fedmoa-hg"})
TASK_ACCURACY_METHODS = frozenset({"fedmoa", "fedmoa-taa"})
SERVER_OPTIMIZER_METHODS = frozenset({"fedadam", "fedyogi", "fedavgm"})
# FedAvg with every auxiliary dropped: what the clients' primaries alone reach (a reference arm).
PRIMARY_ONLY_METHODS = frozenset({"fedavg-primary"})
_ALL_METHODS = frozenset(get_args(Method))
HARM_EVIDENCE_WITHOUT_TEST = (
    "server.accuracy_harm_evidence says what the harm test reads: set server.accuracy_harm_z "
    "to turn the test on, or drop the key"
)
# [server] keys that only some methods read. One set under another method is left over from a
# switch of server.method (a file run with several), so it is warned about, not refused.
SERVER_KEYS_READ: dict[str, frozenset[str]] = {
    "server_optimizer": SERVER_OPTIMIZER_METHODS,
    "fedprox_mu": frozenset({"fedprox"}),
    **dict.fromkeys(
        (
            "t_acc",
            "accuracy_rule",
            "accuracy_noise_scale",
            "accuracy_memory",
            "accuracy_harm_z",
            "accuracy_harm_evidence",
            "max_client_share",
            "gamma",
        ),
        TASK_ACCURACY_METHODS,
    ),
    "server_lr": _ALL_METHODS - {"local"},  # local: every client keeps its own adapter
    # local: a client's own adapter; centralized: its one task's adapter is the global one
    "client_init": _ALL_METHODS - {"local", "centralized"},
}


@dataclass(config=STRICT)
class ClientConfig:
    id: str = Field(min_length=1)  # unique client id
    task: str = Field(min_length=1)  # task name; the server aggregates and mixes per task
    # the client's objectives: exactly one primary, any number of auxiliaries
    rewards: list[RewardConfig] = Field(default_factory=list, validate_default=True)
    data: DataConfig = field(default_factory=DataConfig)  # the client's private rows
    # train / validation / test fractions of those rows
    split: SplitConfig = field(default_factory=SplitConfig)
    local_steps: int = Field(1, gt=0)  # GRPO steps per round
    # AdamW's moments between rounds: "reset" builds them afresh every round (with few local
    # steps each round then starts with sign-like steps); "keep" carries them in the client's
    # state (node-local on Flower) to its next round.
    optimizer_state: Literal["reset", "keep"] = "reset"
    # GRPO settings of the client's local steps
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    # evaluation-only scores of the test completions (e.g. an independent answer check)
    checks: list[CheckConfig] = Field(default_factory=list)

    @field_validator("rewards")
    @classmethod
    def _rewards_valid(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        return check_rewards(rewards)  # as a field check, so errors name ``clients[i].rewards``

    @field_validator("checks")
    @classmethod
    def _checks_unique(cls, checks: list[CheckConfig]) -> list[CheckConfig]:
        check_unique([c.name for c in checks], "check names")
        return checks

    @property
    def primary_reward(self) -> str:
        return next(r.name for r in self.rewards if r.role == "primary")


def check_privacy_fits(privacy: PrivacyConfig | None, server: ServerConfig) -> None:
    """The methods whose aggregates have the sensitivity docs/design.md derives; one line else."""
    if privacy is None:
        return
    method = server.method
    if method in ("local", "centralized") or method in SERVER_OPTIMIZER_METHODS:
        raise ValueError(
            f"privacy: server.method = {method!r} is not supported (it releases no weighted "
            "mean of clipped updates to noise)"
        )


def _default_eval_rewards() -> list[RewardConfig]:
    return [RewardConfig(name="accuracy", function="math_accuracy", role="primary")]


@dataclass(config=STRICT)
class ServerEvalConfig:
    """A held-out set the server owns, scored on the server next to the federated evaluation."""

    data: DataConfig  # the server's own rows; every row is a test row
    # its objectives, exactly one primary (default: math_accuracy as the primary)
    rewards: list[RewardConfig] = Field(
        default_factory=_default_eval_rewards, validate_default=True
    )
    task: str | None = None  # also score this task's adapter; None: the global adapter only
    prompts: int = Field(64, gt=0)  # rows scored (the first ones)
    max_new_tokens: int = Field(64, gt=0)  # new tokens per greedy answer

    @field_validator("rewards")
    @classmethod
    def _rewards_valid(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        return check_rewards(rewards)

    @property
    def primary_reward(self) -> str:
        return next(r.name for r in self.rewards if r.role == "primary")


@dataclass(config=STRICT)
class ServerConfig:
    # federated method: fedmoa, an ablation (fedmoa-hg, fedmoa-taa) or a baseline
    # (fedavg-primary: fedavg training on each client's primary reward alone)
    method: Method = "fedmoa"
    rounds: int = Field(3, gt=0)  # server rounds
    clients_per_round: int | None = Field(None, gt=0)  # clients sampled a round; none: all
    # Clients a deployment waits for when the experiment lists none: each SuperNode brings its
    # own client file (--node-config client-config=...) and tells the server its id and task.
    num_clients: int | None = Field(None, gt=0)
    # Tasks a deployment accepts; a node whose client file names another is left out. None: any.
    tasks: list[str] | None = None
    min_clients: int = Field(1, gt=0)  # fewer usable updates in a round: the run stops
    # Seconds a client's round may take; a client past it is left out of the round (see
    # docs/design.md, "Faults"). None: no limit.
    round_timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    # -- task- and accuracy-aware aggregation --
    t_acc: float = Field(0.1, gt=0)  # accuracy temperature T_acc; smaller favours the accurate
    # "gain": the update's paired gain (after − before on V prompts drawn afresh each round);
    # "noise-aware": a_k pooled over rounds, temperature grown by its standard error;
    # "softmax": the paper's exp(a_k/T_acc) on this round's a_k (docs/design.md)
    accuracy_rule: AccuracyRule = "gain"
    # κ: standard errors of a client's validation record added to the temperature
    accuracy_noise_scale: float = Field(5.0, ge=0, allow_inf_nan=False)
    accuracy_memory: float = Field(0.5, ge=0, lt=1)  # ρ: weight of earlier rounds' outcomes
    # Harm test of the "gain" rule: an update whose paired gain is below 0 by more than this
    # many of its own standard errors gets no weight in its task (one-sided; 2.33 ≈ 1%);
    # none: off (docs/design.md, "Excluding a harmful update")
    accuracy_harm_z: float | None = Field(None, gt=0, allow_inf_nan=False)
    # what the harm test reads: "round", this round's pairs (the update it judges);
    # "record", the client's discounted record with its earlier updates' pairs; "either":
    # both, and an update failing either is excluded
    accuracy_harm_evidence: HarmEvidence = "round"
    max_client_share: float = Field(1.0, gt=0, le=1)  # cap on α_k within a task; 1 = none
    # task-mix exponent: 0 gives every task an equal share, 1 weights tasks by samples
    gamma: float = Field(0.0, ge=0)
    # server learning rate η_s: scales the aggregated update (a server optimiser's step too)
    server_lr: float = Field(1.0, gt=0)
    # clients start a round from the global adapter or from their task's adapter
    client_init: Literal["global", "task"] = "global"
    # drop updates whose norm exceeds this many times the median norm; none: off
    robust_norm: float | None = Field(None, gt=0)
    # -- baselines --
    fedprox_mu: float = Field(0.01, ge=0)  # FedProx proximal coefficient μ
    # FedAdam/FedYogi/FedAvgM settings (e.g. eta, beta_1, tau) for those methods
    server_optimizer: dict[str, float] = field(default_factory=dict)
    # -- evaluation --
    validation_prompts: int = Field(16, gt=0)  # V, for the accuracy a_k each client reports
    # Evaluate the starting (untrained) adapter before round 1, as round 0.
    eval_round0: bool = True
    eval_every: int = Field(1, ge=0)  # rounds between test evaluations; 0: only at the end
    test_prompts: int = Field(16, gt=0)  # test rows per client and evaluation
    # new tokens per greedy evaluation answer; none: the client's max_new_tokens
    eval_max_new_tokens: int | None = Field(None, gt=0)
    # Also score each client's own locally trained adapter (one more greedy pass per client).
    eval_local_models: bool = True
    # [server.eval_data]: also score the global adapter (and one task's) on a set the server
    # holds, on the server; off by default (evaluation runs on the clients' own test rows)
    eval_data: ServerEvalConfig | None = None
    # How adapters travel (start adapter down, Δθ up): "float32" as they are (LoRA tensors are
    # float32), "float16"/"bfloat16" rounded to that dtype, half the bytes; the server keeps
    # and aggregates its adapters in their own dtype.
    transport_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _harm_test_needs_gain(self) -> ServerConfig:
        if self.accuracy_harm_z is not None and self.accuracy_rule != "gain":
            raise ValueError(
                f"server.accuracy_harm_z tests the paired gain: it needs accuracy_rule = "
                f"'gain', not {self.accuracy_rule!r}"
            )
        if self.accuracy_harm_z is None and self.accuracy_harm_evidence != "round":
            raise ValueError(HARM_EVIDENCE_WITHOUT_TEST)
        return self


@dataclass(config=STRICT)
class ExperimentConfig:
    # the clients: [[clients]] tables, or paths of client files holding one each (relative to
    # this file); [client_defaults] is merged under each. Empty in a deployment whose SuperNodes
    # bring their own client files (then server.num_clients says how many).
    clients: list[ClientConfig] = Field(default_factory=list)
    seed: int = 0  # seeds LoRA init, data splits, client sampling and every client's sampler
    # run directory (metrics.jsonl, checkpoints, adapters); --output overrides it
    output_dir: str = "runs/experiment"
    # [model]: the base model every client shares
    model: ModelConfig = field(default_factory=ModelConfig)
    # [lora]: the adapter that is trained and exchanged
    lora: LoraConfig = field(default_factory=LoraConfig)
    # [server]: method, rounds, aggregation and evaluation
    server: ServerConfig = field(default_factory=ServerConfig)
    # Every client's weighting. ``method = "auto"``: hypergradient for fedmoa/fedmoa-hg, static
    # for the others; a dynamic method (e.g. "saw") with fedavg gives FedAvg + that weighting.
    # ``[hypergradient]`` is accepted as another name for this table (older experiments).
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    # [client_defaults] as given (its paths relative to this file): merged under each listed
    # client here, and under each node's own client file in a deployment (the server sends it)
    client_defaults: dict[str, Any] = Field(default_factory=dict)
    # [privacy]: client-level differential privacy of the aggregates (docs/design.md,
    # "Differential privacy"); none: off
    privacy: PrivacyConfig | None = None

    @field_validator("clients")
    @classmethod
    def _clients_valid(cls, clients: list[ClientConfig]) -> list[ClientConfig]:
        check_unique([c.id for c in clients], "client ids")
        return clients

    @model_validator(mode="after")
    def _server_fits_clients(self) -> ExperimentConfig:
        expected = self.server.num_clients
        if not self.clients and expected is None:
            raise ValueError(
                "clients: at least one [[clients]] entry is required, or server.num_clients for "
                "a deployment whose SuperNodes bring their own client files"
            )
        if self.clients and expected is not None and expected != len(self.clients):
            raise ValueError(
                f"server.num_clients = {expected} but the experiment lists {len(self.clients)} "
                "clients"
            )
        count = len(self.clients) or expected or 0
        per_round = self.server.clients_per_round
        if per_round is not None and per_round > count:
            raise ValueError(f"server.clients_per_round = {per_round} exceeds the {count} clients")
        tasks = self.server.tasks
        for i, client in enumerate(self.clients if tasks is not None else []):
            if client.task not in tasks:
                raise ValueError(f"clients[{i}].task = {client.task!r} is not in server.tasks")
        eval_task = self.server.eval_data.task if self.server.eval_data else None
        known = tasks if tasks is not None else [c.task for c in self.clients]
        if eval_task is not None and known and eval_task not in known:
            raise ValueError(f"server.eval_data.task = {eval_task!r} is no task of the clients")
        if self.server.min_clients > (per_round or count):
            raise ValueError("server.min_clients exceeds the clients sampled per round")
        check_privacy_fits(self.privacy, self.server)
        weighting, method = self.weighting.method, self.server.method
        if method in HYPERGRADIENT_METHODS and weighting not in ("auto", "hypergradient"):
            raise ValueError(
                f"weighting.method = {weighting!r} contradicts server.method = {method!r}, "
                "whose clients use hypergradient weights (fedmoa-taa is task-aware aggregation "
                "with other weights)"
            )
        if method == "centralized" and weighting not in ("auto", "static"):
            raise ValueError("weighting.method: the centralized baseline uses static weights")
        if method in SERVER_OPTIMIZER_METHODS:
            try:
                check_server_optimizer(method, self.server.server_optimizer)
            except ConfigError as err:
                raise ValueError(f"server.server_optimizer: {err}") from None
        resolved = resolve_method(weighting, method)
        for i, client in enumerate(self.clients):
            if resolved != "static":
                check_weight_floor(self.weighting.w_min, len(client.rewards), f"clients[{i}]")
            check_advantage(resolved, client.grpo.advantage, f"clients[{i}].grpo")
        return self


def unread_server_keys(server: ServerConfig, given: Collection[str]) -> list[str]:
    """One line for each key of ``given`` (the ``[server]`` keys a file sets) that
    ``server.method`` does not read (``SERVER_KEYS_READ``)."""
    return [
        f"server.{key} is ignored: server.method = {server.method!r} does not read it (read "
        f"only by {', '.join(m for m in get_args(Method) if m in methods)})"
        for key, methods in SERVER_KEYS_READ.items()
        if key in given and server.method not in methods
    ]


def load_experiment(path: str | Path, origin: Path | None = None) -> ExperimentConfig:
    """Read, merge ``[client_defaults]`` into each client, validate (strictly typed); errors name
    the field path, in ``[client_defaults]`` when the bad value came from there.

    ``origin``: the folder the file's relative paths start from when the file was copied away
    from it (a run directory's ``config.toml``); by default the file's own folder.

    A ``clients`` entry may be a table or the path of a client file holding that table (a data
    owner's own file); paths inside a client file are relative to it. ``[weighting]`` and
    ``[server]`` keys the run's method does not read are refused when they contradict the
    file, and warned about once when left over from another method (``report_unread``).
    """
    data = read_toml(path)
    base = origin if origin is not None else config_dir(path)
    legacy = "hypergradient" in data
    if legacy:
        if "weighting" in data:
            raise ConfigError(
                f"{path}: hypergradient: [hypergradient] and [weighting] are the same table; "
                "keep [weighting]"
            )
        data["weighting"] = data.pop("hypergradient")
        if isinstance(data["weighting"], dict) and "method" in data["weighting"]:
            raise ConfigError(f"{path}: hypergradient.method: unknown key (it is weighting.method)")
    defaults = data.pop("client_defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: client_defaults: must be a table")
    clients = data.get("clients", [])
    files: dict[int, Path] = {}  # index -> the client file it came from
    if isinstance(clients, list):
        for i, entry in enumerate(clients):
            if isinstance(entry, str):
                files[i], clients[i] = read_client_file(entry, path, i, base)
        data["clients"] = [
            merge_defaults(defaults, c) if isinstance(c, dict) else c for c in clients
        ]
    data = anchor_paths(data, base)  # relative to this file, not the cwd
    data["client_defaults"] = anchor_paths(defaults, base)

    def locate(loc: Location) -> str:
        if legacy and loc and loc[0] == "weighting":
            return field_path(("hypergradient", *loc[1:]))
        if len(loc) > 2 and loc[0] == "clients" and isinstance(loc[1], int):
            own = clients[loc[1]] if isinstance(clients, list) and loc[1] < len(clients) else None
            if _from_defaults(own, defaults, loc[2:]):
                return f"{field_path(('client_defaults', *loc[2:]))} (in clients[{loc[1]}])"
            if loc[1] in files:
                return f"{files[loc[1]]}: {field_path(loc[2:])} (clients[{loc[1]}])"
        return field_path(loc)

    cfg = parse_config(data, ExperimentConfig, str(path), strict=True, locate=locate)
    server_keys = given_keys(data, "server")
    if "accuracy_harm_evidence" in server_keys and cfg.server.accuracy_harm_z is None:
        raise ConfigError(f"{path}: {HARM_EVIDENCE_WITHOUT_TEST}")
    table = "hypergradient" if legacy else "weighting"
    report_unread(
        str(path),
        lambda: [
            *unread_keys(cfg.weighting, given_keys(data, "weighting"), cfg.server.method, table),
            *unread_server_keys(cfg.server, server_keys),
        ],
    )
    return cfg


def load_client_file(path: str | Path, defaults: dict[str, Any] | None = None) -> ClientConfig:
    """A data owner's client file on its own (a SuperNode's ``client-config``), its paths
    relative to it, merged over the server's ``[client_defaults]`` as a listed client's table
    is; errors name the file and the field (and the server's defaults, when a bad value came
    from there)."""
    file = Path(path).expanduser()
    table = anchor_paths(read_toml(file), config_dir(file))
    defaults = defaults or {}

    def locate(loc: Location) -> str:
        if _from_defaults(table, defaults, loc):
            return f"{field_path(loc)} (from the server's [client_defaults])"
        return field_path(loc)

    return parse_config(
        merge_defaults(defaults, table), ClientConfig, str(file), strict=True, locate=locate
    )


def check_client_fits(cfg: ExperimentConfig, client: ClientConfig, where: str) -> None:
    """What ``ExperimentConfig`` checks for a listed client, for one that came from its own
    file: its task is accepted, the weight floor fits its objectives and its advantage mode
    suits the weighting."""
    tasks = cfg.server.tasks
    if tasks is not None and client.task not in tasks:
        raise ConfigError(
            f"{where}: task = {client.task!r} is not in the server's tasks ({', '.join(tasks)})"
        )
    weighting = resolve_method(cfg.weighting.method, cfg.server.method)
    try:
        if weighting != "static":
            check_weight_floor(cfg.weighting.w_min, len(client.rewards), where)
        check_advantage(weighting, client.grpo.advantage, f"{where}: grpo")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def read_client_file(
    entry: str, experiment: str | Path, index: int, base: Path
) -> tuple[Path, dict[str, Any]]:
    """A client file named in ``clients`` (relative to ``base``, the experiment's folder), its
    paths anchored."""
    file = Path(os.path.normpath(base / Path(entry).expanduser()))
    try:
        table = read_toml(file)
    except ConfigError as err:
        raise ConfigError(f"{experiment}: clients[{index}]: {err}") from None
    return file, anchor_paths(table, config_dir(file))


def _from_defaults(client: Any, defaults: Any, loc: Location) -> bool:
    """Whether the value at ``loc`` in a merged client came from ``[client_defaults]``."""
    for key in loc:
        if not isinstance(key, str) or not isinstance(client, dict):
            return False
        if key not in client:
            return isinstance(defaults, dict) and key in defaults
        if key in OPAQUE_TABLES:
            return False
        client = client[key]
        defaults = defaults.get(key) if isinstance(defaults, dict) else None
    return False
