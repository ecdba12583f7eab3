"""Plans as JSON files: ``offloadkit plan --out plan.json`` writes one, ``simulate --plan plan.json`` reads it.

A plan found by the partition (seconds of an LP and of simulation) can be kept, read, edited by hand
and run again. The file holds a format name and version, the name of the model the plan was made for,
and every field of :class:`~offloadkit.plan.plans.Plan`::

    {"format": "offloadkit-plan", "version": 1, "model": "mixtral-8x7b", "policy": "scheinfer",
     "label": "scheinfer", "assign": "balance", "stream_min_tokens": null, "staging_buffers": 2,
     "pinned": true, "ubatch": null, "serial": false, "kv_on_gpu": [true, ...],
     "gg_rows": {"L0.attn_qkv": 6144, ...}, "meta": {"chunk": 128, ...}}

Reading refuses, with one line of :class:`~offloadkit.errors.PlanError` that starts with the file name,
anything it would otherwise have to guess about: a file that is not JSON or not a plan, another format
version, unknown or missing keys, a plan made for another model, a block the model does not have, more
rows resident than a block has (or fewer than none), ``kv_on_gpu`` of the wrong length, an unknown
assignment rule, values of the wrong type. ``meta`` must be JSON: tuples in it come back as lists.

:func:`resolve_plan` is what the command line calls for ``--plan``: the built-in forms of
:func:`~offloadkit.plan.plans.parse_plan` (``all-cpu``, ``all-gpu``, ``ngl:N``) or a path ending in ``.json``.
"""

from __future__ import annotations

import difflib
import json
import operator
import os
from pathlib import Path
from typing import Any

from offloadkit.errors import PlanError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import ASSIGN_RULES, PLAN_FORMS, Plan, parse_plan, plan_blocks, units

FORMAT = "offloadkit-plan"
VERSION = 1
#: The keys of a plan file, in the order they are written.
KEYS = ("format", "version", "model", "policy", "label", "assign", "stream_min_tokens", "staging_buffers",
        "pinned", "ubatch", "serial", "kv_on_gpu", "gg_rows", "meta")


def model_name(spec: ModelSpec) -> str:
    """The name a plan file records for ``spec`` (its zoo/config name, else its architecture)."""
    return spec.name or spec.arch


# ---- writing -------------------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    """numpy scalars and arrays (in a plan's meta) as plain Python numbers and lists."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON")


def plan_to_dict(plan: Plan, spec: ModelSpec) -> dict[str, Any]:
    """The plan file's content; the plan is checked against ``spec`` first, as reading it back would be."""
    where = f"plan {plan.name}"
    order = {b.name: i for i, b in enumerate(plan_blocks(spec))}  # written in the model's order
    try:  # numpy integers become ints; a float number of rows is refused, not rounded
        gg = {name: operator.index(rows) for name, rows in
              sorted(plan.gg_rows.items(), key=lambda item: order.get(item[0], len(order)))}
    except TypeError as e:
        raise PlanError(f"{where}: gg_rows must be whole numbers of rows ({e})") from e
    data = {"format": FORMAT, "version": VERSION, "model": model_name(spec), "policy": plan.policy,
            "label": plan.label, "assign": plan.assign, "stream_min_tokens": plan.stream_min_tokens,
            "staging_buffers": plan.staging_buffers, "pinned": plan.pinned, "ubatch": plan.ubatch,
            "serial": plan.serial, "kv_on_gpu": [bool(x) for x in plan.kv_on_gpu], "gg_rows": gg,
            "meta": dict(plan.meta)}
    _check_against(data, spec, where)
    return data


def plan_to_json(plan: Plan, spec: ModelSpec) -> str:
    """The text of a plan file: one key per line, ``gg_rows`` and ``meta`` one entry per line."""
    data = plan_to_dict(plan, spec)

    def dump(x: Any) -> str:
        try:
            return json.dumps(x, default=_jsonable, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan {plan.name}: its meta cannot be written as JSON ({e})") from e

    lines = []
    for key in KEYS:
        value = data[key]
        if key in ("gg_rows", "meta") and value:
            inner = ",\n".join(f"    {dump(k)}: {dump(v)}" for k, v in value.items())
            lines.append(f"  {dump(key)}: {{\n{inner}\n  }}")
        else:
            lines.append(f"  {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_plan(plan: Plan, spec: ModelSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``plan`` (made for ``spec``) to ``path`` as JSON; returns the path."""
    p = Path(path).expanduser()
    p.write_text(plan_to_json(plan, spec), encoding="utf-8")
    return p


# ---- reading -------------------------------------------------------------------------------------------

def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def load_plan(path: str | os.PathLike[str], spec: ModelSpec) -> Plan:
    """Read a plan file written by :func:`save_plan` (or by hand) for ``spec``; see the module docstring."""
    shown = os.fspath(path)
    where = f"plan file {shown}"
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PlanError(f"{where}: no such file (write one with offloadkit plan --out {shown})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise PlanError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except ValueError as e:
        raise PlanError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PlanError(f"{where}: not an offloadkit plan (a plan file is a JSON object with "
                        f"\"format\": \"{FORMAT}\"; write one with offloadkit plan --out)")
    return plan_from_dict(data, spec, where)


def plan_from_dict(data: dict[str, Any], spec: ModelSpec, where: str = "plan") -> Plan:
    """The :class:`Plan` a plan file's content describes, checked against ``spec``; ``where`` starts messages."""
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        raise PlanError(f"{where}: format version {version!r}; this offloadkit reads version {VERSION}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PlanError(f"{where}: unknown key {unknown[0]!r} (a plan file has {', '.join(KEYS)})")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise PlanError(f"{where}: {missing[0]!r} is missing (a plan file has {', '.join(KEYS)})")
    _check_against(data, spec, where)
    try:
        return Plan(data["policy"], dict(data["gg_rows"]), tuple(data["kv_on_gpu"]), label=data["label"],
                    stream_min_tokens=data["stream_min_tokens"], staging_buffers=data["staging_buffers"],
                    pinned=data["pinned"], meta=dict(data["meta"]), assign=data["assign"], ubatch=data["ubatch"],
                    serial=data["serial"])
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from e


def resolve_plan(text: str, spec: ModelSpec) -> Plan:
    """``--plan`` of the command line: ``all-cpu``, ``all-gpu``, ``ngl:N`` (:func:`parse_plan`) or ``PATH.json``."""
    if text.endswith(".json"):
        return load_plan(text, spec)
    if text in ("all-cpu", "all-gpu") or text.startswith("ngl:"):
        return parse_plan(text, spec)
    raise PlanError(f"unknown plan {text!r}: the plans are {', '.join(PLAN_FORMS)} (N decoder layers on the GPU, "
                    f"e.g. ngl:8) or a plan file PATH.json (written by offloadkit plan --out)")


# ---- the checks ----------------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_against(data: dict[str, Any], spec: ModelSpec, where: str) -> None:
    """Every field's type and range, and that the plan is one of ``spec`` (model, blocks, rows, layers)."""
    name = model_name(spec)
    for key in ("model", "policy", "label", "assign"):
        if not isinstance(data[key], str):
            raise PlanError(f"{where}: {key} must be a string, got {data[key]!r}")
    if data["model"] != name:
        raise PlanError(f"{where}: made for {data['model']!r}, not {name!r}; make one for {name} with "
                        f"offloadkit plan --model {name} --out PATH.json")
    if not data["policy"]:
        raise PlanError(f"{where}: policy must name who made the plan (e.g. scheinfer), got an empty string")
    if data["assign"] not in ASSIGN_RULES:
        raise PlanError(f"{where}: unknown assign rule {data['assign']!r}; the rules are {', '.join(ASSIGN_RULES)}")
    for key in ("pinned", "serial"):
        if not isinstance(data[key], bool):
            raise PlanError(f"{where}: {key} must be true or false, got {data[key]!r}")
    for key, least in (("staging_buffers", 1), ("stream_min_tokens", 1), ("ubatch", 1)):
        value = data[key]
        if value is None and key != "staging_buffers":
            continue
        if not _is_int(value) or value < least:
            raise PlanError(f"{where}: {key} must be an integer >= {least}"
                            + (" or null" if key != "staging_buffers" else "") + f", got {value!r}")
    if data["stream_min_tokens"] is not None and data["assign"] == "cpu":
        raise PlanError(f"{where}: stream_min_tokens goes with the threshold rule, but assign is 'cpu' "
                        f"(which never streams): set assign to 'threshold' or stream_min_tokens to null")
    kv = data["kv_on_gpu"]
    if not isinstance(kv, (list, tuple)) or not all(isinstance(x, bool) for x in kv):
        raise PlanError(f"{where}: kv_on_gpu must be a list of true/false, one per layer")
    if len(kv) != spec.n_layers:
        raise PlanError(f"{where}: kv_on_gpu has {len(kv)} entries but {name} has {spec.n_layers} layers")
    meta = data["meta"]
    if not isinstance(meta, dict):
        raise PlanError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    if "chunk" in meta and not (_is_int(meta["chunk"]) and meta["chunk"] >= 1):
        raise PlanError(f"{where}: meta chunk (the row chunk of the token assignment) must be an integer >= 1, "
                        f"got {meta['chunk']!r}")
    _check_gg_rows(data["gg_rows"], spec, where)


def _check_gg_rows(gg: Any, spec: ModelSpec, where: str) -> None:
    if not isinstance(gg, dict):
        raise PlanError(f"{where}: gg_rows must be an object of block name -> rows resident on the GPU")
    sizes = {b.name: units(b) for b in plan_blocks(spec)}
    name = model_name(spec)
    for block, rows in gg.items():
        if block not in sizes:
            close = difflib.get_close_matches(str(block), list(sizes), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PlanError(f"{where}: {name} has no block {block!r} ({hint}its blocks are L0..L{spec.n_layers - 1}"
                            f".<kind> and embed, final_norm, lm_head; offloadkit info {name} lists them by kind); "
                            f"is the plan for another model?")
        if not _is_int(rows):
            raise PlanError(f"{where}: gg_rows[{block!r}] must be a whole number of rows, got {rows!r}")
        if rows < 0:
            raise PlanError(f"{where}: gg_rows[{block!r}] is {rows}, negative; rows resident must be 0..{sizes[block]}")
        if rows > sizes[block]:
            what = (f"{sizes[block]} rows" if sizes[block] > 1
                    else "1 (a block that is never split is resident whole, 1, or not, 0)")
            raise PlanError(f"{where}: gg_rows[{block!r}] is {rows}, more than the block has: {what}")


__all__ = ["FORMAT", "KEYS", "VERSION", "load_plan", "model_name", "plan_from_dict", "plan_to_dict", "plan_to_json",
           "resolve_plan", "save_plan"]
