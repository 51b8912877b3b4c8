"""A policy spec: one TOML file that says what a policy decides, from which features.

It is the general way in: ``policyloop create SPEC`` starts a policy from nothing with it (the
built-in simulators are examples of such specs). Keys, with what they mean::

    name = "router"                 # the policy's name in the registry and in requests
    kind = "actions"                # "actions": a fixed set of action ids (routing);
                                    # "ranking": rank the candidates each request sends
    actions = ["billing", "tech"]   # kind = "actions" only: the action ids, in order

    [features]
    context = ["age", "tenure"]     # the context features, by name, in this order
    action = ["price", "rating"]    # kind = "ranking" only: each candidate's features
    missing = "error"               # a request naming only some features is refused;
                                    # "zero": the others are 0 (one-hot groups, counts)

    [features.categorical]          # optional: features whose values are strings
    plan = ["free", "pro", "team"]  # a vocabulary: a column per value ("plan=free", ...);
                                    # another value sets none
    country = { hash = 64 }         # or 64 hashed columns ("country#0" ...), any value

    [model]
    type = "linear"                 # a linear model: learns from the first reward
    interactions = true             # ranking: also context x candidate products (VW's -q)
    # type = "mlp"                  # or a neural network: hidden layer, then the embedding
    # hidden = 64                   # the learner's head reads (`create`: random body, zero
    # embedding = 32                # head; `learn --network` trains the body too; `train
                                    # --data`: the network it fits, of these sizes)

    [exploration]                   # optional: serve's default for this policy
    strategy = "thompson"           # any strategy of serving/exploration.py; a server's
                                    # --policy NAME=STRATEGY overrides it

    [reward]                        # optional: the reward contract learn joins with
    window_s = 30                   # how long a decision waits for its reward (seconds)
    default = 0.0                   # the reward of a decision none arrived for
    rule = "first"                  # several rewards: "first" counts, or "sum" adds them
                                    # (learn's --window-ms, --default-reward, --reward-rule
                                    # override them)

    [data]                          # optional: the columns of `policyloop train --data FILE`
    action = "action"               # the logged action's id (ranking: a candidate's id)
    reward = "reward"               # the observed reward
    propensity = "propensity"       # P(action | context) under the logging policy, in (0, 1]
    candidates = "candidates"       # ranking: [{"id": ..., "features": {name: value}}, ...]
                                    # (the context features: a column each, by its name)

A feature named in ``[features.categorical]`` (it must be one of ``context`` or ``action``) is
sent as a string (a request's ``categorical`` map, a log file's text) and becomes its block of
columns in the model (``policyloop.contract.signature.Categorical``); the others are numbers.
Every error names the key and the bad value.

>>> spec = parse_spec('name = "r"\\nkind = "actions"\\nactions = ["a", "b"]\\n'
...                   '[features]\\ncontext = ["x", "y"]\\n')
>>> spec.policy_kind.name, spec.actions, spec.features.context
('qnet', ('a', 'b'), ('x', 'y'))
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policyloop.contract.errors import InvalidArgument, shown
from policyloop.contract.events import REWARD_LIMIT
from policyloop.contract.kinds import PolicyKind, kind_of
from policyloop.contract.signature import (
    MISSING_FEATURES,
    POLICY_NAME,
    Categorical,
    FeatureSchema,
    PolicyDefaults,
)

# the spec's words for the kinds, and the kind each names
SPEC_KINDS = {"actions": "qnet", "ranking": "scoring"}
MODEL_TYPES = ("linear", "mlp")
MAX_WIDTH = 4096  # an MLP layer's width
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")
MAX_WINDOW_S = 7 * 24 * 3600  # a reward window of at most a week
REWARD_RULES = ("first", "sum")
MAX_CATEGORIES = 65_536  # columns one categorical feature may become (vocabulary or buckets)
_KEYS = {"": {"name", "kind", "actions", "features", "model", "data", "exploration", "reward"},
         "exploration": {"strategy"}, "reward": {"window_s", "default", "rule"},
         "features": {"context", "action", "missing", "categorical"},
         "model": {"type", "interactions", "hidden", "embedding"},
         "data": {"action", "reward", "propensity", "candidates"}}


@dataclass(frozen=True)
class ModelSpec:
    type: str = "linear"
    interactions: bool = True  # linear ranking: context x candidate features in the embedding
    hidden: int = 64  # mlp: the hidden layer's width
    embedding: int = 32  # mlp: the embedding's width, which the learnable head reads


@dataclass(frozen=True)
class DataSpec:
    """The columns of a log file: ``policyloop/simulators/logfile.py`` reads them."""

    action: str = "action"
    reward: str = "reward"
    propensity: str = "propensity"
    candidates: str = "candidates"  # ranking only


@dataclass(frozen=True)
class PolicySpec:
    name: str
    kind: str  # a name in policyloop.contract.kinds.KINDS
    features: FeatureSchema
    actions: tuple[str, ...] = ()
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    defaults: PolicyDefaults = PolicyDefaults()

    @property
    def policy_kind(self) -> PolicyKind:
        return kind_of(self.kind)


def load_spec(path: Path) -> PolicySpec:
    """Read and check a spec file; InvalidArgument names the file and what is wrong."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"spec {path}: cannot read it: {exc}") from exc
    try:
        return parse_spec(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"spec {path}: {exc}") from exc


def parse_spec(text: str) -> PolicySpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"not valid TOML: {exc}") from exc
    _known(raw, "")
    name = _string(raw, "name")
    if not POLICY_NAME.fullmatch(name):
        raise InvalidArgument(f"name: {name!r} must be 1-64 of a-z 0-9 _ - starting with a "
                              "letter or digit")
    kind_word = _string(raw, "kind")
    if kind_word not in SPEC_KINDS:
        raise InvalidArgument(f"kind: {kind_word!r} is not one of {sorted(SPEC_KINDS)}")
    kind = SPEC_KINDS[kind_word]
    features = raw.get("features")
    if not isinstance(features, dict):
        raise InvalidArgument("features: a [features] table with a context list is required")
    _known(features, "features")
    context = _names(features, "context", required=True)
    action = _names(features, "action", required=False)
    actions: tuple[str, ...] = ()
    if kind_word == "actions":
        actions = _names(raw, "actions", required=True, what="action id")
        if action:
            raise InvalidArgument("features.action: a fixed action set takes no per-action "
                                  "features (use kind = \"ranking\")")
    else:
        if "actions" in raw:
            raise InvalidArgument("actions: a ranking policy ranks the candidates each request "
                                  "sends; list no actions")
        if not action:
            raise InvalidArgument("features.action: a ranking policy needs each candidate's "
                                  "features")
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise InvalidArgument(f"model: must be a table, got {model!r}")
    _known(model, "model")
    model_type = model.get("type", "linear")
    if model_type not in MODEL_TYPES:
        raise InvalidArgument(f"model.type: {model_type!r} is not one of {list(MODEL_TYPES)}")
    interactions = model.get("interactions", True)
    if not isinstance(interactions, bool):
        raise InvalidArgument(f"model.interactions: must be true or false, got "
                              f"{interactions!r}")
    sizes = {}
    for key in ("hidden", "embedding"):
        if key not in model:
            continue
        if model_type != "mlp":
            raise InvalidArgument(f"model.{key}: only a type = \"mlp\" model has layer sizes")
        width = model[key]
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
            raise InvalidArgument(f"model.{key}: a width in [1, {MAX_WIDTH}] is required, got "
                                  f"{shown(width)}")
        sizes[key] = width
    if model_type == "mlp" and "interactions" in model:
        raise InvalidArgument("model.interactions: a type = \"mlp\" model learns its own "
                              "interactions; the key is for type = \"linear\"")
    missing = features.get("missing", "error")
    if missing not in MISSING_FEATURES:
        raise InvalidArgument(f"features.missing: {missing!r} is not one of "
                              f"{list(MISSING_FEATURES)}")
    data = _data(raw.get("data", {}))
    taken = {getattr(data, column): column for column in ("action", "reward", "propensity",
                                                          "candidates")}
    clash = next((name for name in context if name in taken), None)
    if clash is not None:  # a log file's column would be read as two things
        raise InvalidArgument(f"features.context: {clash!r} is also the log's "
                              f"{taken[clash]} column (data.{taken[clash]}); rename one")
    categorical = _categorical(features.get("categorical", {}), context + action)
    by_name = {c.name: c for c in categorical}

    def columns(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(column for n in names
                     for column in (by_name[n].columns if n in by_name else (n,)))

    schema = FeatureSchema(columns(context), columns(action), missing, categorical)
    return PolicySpec(name, kind, schema, actions,
                      ModelSpec(model_type, interactions, **sizes), data,
                      _defaults(raw.get("exploration", {}), raw.get("reward", {})))


def _defaults(exploration: Any, reward: Any) -> PolicyDefaults:
    for key, table in (("exploration", exploration), ("reward", reward)):
        if not isinstance(table, dict):
            raise InvalidArgument(f"{key}: must be a table, got {shown(table)}")
        _known(table, key)
    strategy = exploration.get("strategy", "")
    if not isinstance(strategy, str) or ("strategy" in exploration and not strategy):
        # its grammar is serving's: the commands that publish check it (policyloop/create.py
        # check_exploration), as this layer may not import serving
        raise InvalidArgument(f"exploration.strategy: a strategy such as \"thompson\" is "
                              f"required, got {shown(strategy)}")
    window_ms = None
    if "window_s" in reward:
        window = reward["window_s"]
        if (isinstance(window, bool) or not isinstance(window, int | float)
                or not 0.001 <= window <= MAX_WINDOW_S):
            raise InvalidArgument(f"reward.window_s: seconds in [0.001, {MAX_WINDOW_S}], got "
                                  f"{shown(window)}")
        window_ms = round(window * 1000)
    default = reward.get("default")
    if default is not None and (isinstance(default, bool) or not isinstance(default, int | float)
                                or not math.isfinite(default) or abs(default) > REWARD_LIMIT):
        raise InvalidArgument(f"reward.default: a finite number within ±{REWARD_LIMIT:g}, got "
                              f"{shown(default)}")
    rule = reward.get("rule", "")
    if "rule" in reward and rule not in REWARD_RULES:
        raise InvalidArgument(f"reward.rule: {shown(rule)} is not one of {list(REWARD_RULES)}")
    return PolicyDefaults(strategy, window_ms, None if default is None else float(default), rule)


def _categorical(table: Any, names: tuple[str, ...]) -> tuple[Categorical, ...]:
    if not isinstance(table, dict):
        raise InvalidArgument(f"features.categorical: must be a table, got {table!r}")
    out = []
    for name, encoding in table.items():
        where = f"features.categorical.{name}"
        if name not in names:
            raise InvalidArgument(f"{where}: {name!r} is not in features.context or "
                                  "features.action")
        if isinstance(encoding, list):
            if not encoding or not all(isinstance(v, str) and v for v in encoding):
                raise InvalidArgument(f"{where}: a vocabulary is a non-empty list of non-empty "
                                      f"strings, got {shown(encoding)}")
            if len(set(encoding)) != len(encoding):
                twice = next(v for v in encoding if encoding.count(v) > 1)
                raise InvalidArgument(f"{where}: {shown(twice)} appears twice")
            if len(encoding) > MAX_CATEGORIES:
                raise InvalidArgument(f"{where}: {len(encoding)} values, at most "
                                      f"{MAX_CATEGORIES} (hash them: {{ hash = N }})")
            out.append(Categorical(name, vocabulary=tuple(encoding)))
        elif isinstance(encoding, dict) and set(encoding) == {"hash"}:
            buckets = encoding["hash"]
            if (isinstance(buckets, bool) or not isinstance(buckets, int)
                    or not 1 <= buckets <= MAX_CATEGORIES):
                raise InvalidArgument(f"{where}.hash: the number of hashed columns, an int in "
                                      f"[1, {MAX_CATEGORIES}], got {shown(buckets)}")
            out.append(Categorical(name, buckets=buckets))
        else:
            raise InvalidArgument(f"{where}: a list of values or {{ hash = N }} is required, "
                                  f"got {shown(encoding)}")
    return tuple(out)


def _data(table: Any) -> DataSpec:
    if not isinstance(table, dict):
        raise InvalidArgument(f"data: must be a table, got {table!r}")
    _known(table, "data")
    columns = {}
    for key, value in table.items():
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"data.{key}: a column name is required, got {value!r}")
        columns[key] = value
    return DataSpec(**columns)


def _known(table: dict[str, Any], where: str) -> None:
    unknown = sorted(set(table) - _KEYS[where])
    if unknown:
        prefix = f"{where}." if where else ""
        raise InvalidArgument(f"{prefix}{unknown[0]}: unknown key; known keys are "
                              f"{sorted(_KEYS[where])}")


def _string(table: dict[str, Any], key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str):
        raise InvalidArgument(f"{key}: a string is required, got {value!r}")
    return value


def _names(table: dict[str, Any], key: str, *, required: bool,
           what: str = "feature name") -> tuple[str, ...]:
    where = key if key == "actions" else f"features.{key}"
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where}: a list of strings is required, got {value!r}")
    if required and not value:
        raise InvalidArgument(f"{where}: at least one {what} is required")
    for v in value:
        if not _NAME.fullmatch(v):
            raise InvalidArgument(f"{where}: {v!r} is not a valid {what}")
    seen = set()
    for v in value:
        if v in seen:
            raise InvalidArgument(f"{where}: {v!r} appears twice")
        seen.add(v)
    return tuple(value)
