"""Plan files: every policy's plan survives save -> load unchanged, and a file that is not exactly a plan of the
model is refused in one line that names the file and what is wrong."""

import json
from dataclasses import fields, replace

import numpy as np
import pytest

from offloadkit.errors import PlanError
from offloadkit.hardware.catalog import load_profile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plan_io import KEYS, load_plan, plan_to_dict, resolve_plan, save_plan
from offloadkit.plan.plans import Plan, Workload, parse_plan
from offloadkit.plan.policies import POLICIES, make_plan
from offloadkit.runtime.sim import simulate

W = Workload(128, 8)
#: (model, profile): on the first, gpu-only does not fit (it is refused, not saved); on the second every
#: policy runs, gpu-only and fiddler included.
CASES = [("mixtral-8x7b", "rtx4090-desktop"), ("qwen1.5-moe-a2.7b", "rtxa6000-workstation")]


@pytest.fixture(scope="module")
def mixtral():
    return load_spec("mixtral-8x7b")


def assert_same_plan(a: Plan, b: Plan) -> None:
    for f in fields(Plan):
        assert getattr(a, f.name) == getattr(b, f.name), f.name
    assert a == b


@pytest.mark.parametrize("model, profile", CASES)
def test_every_policys_plan_round_trips(tmp_path, model, profile):
    spec, hw = load_spec(model), load_profile(profile)
    saved = 0
    for policy in POLICIES:
        try:
            plan = make_plan(policy, spec, hw, W, "zipf:1.2")
        except PlanError:
            assert (model, policy) == ("mixtral-8x7b", "gpu-only"), policy  # 87 GiB does not fit 23 GiB
            continue
        path = save_plan(plan, spec, tmp_path / f"{policy}.json")
        raw = json.loads(path.read_text())
        assert list(raw) == list(KEYS) and raw["model"] == model and raw["policy"] == plan.policy
        back = load_plan(path, spec)
        assert_same_plan(back, plan)
        saved += 1
    assert saved == len(POLICIES) - (model == "mixtral-8x7b")


def test_a_loaded_plan_simulates_exactly_as_the_original(tmp_path, mixtral):
    hw = load_profile("rtx4090-desktop")
    plan = make_plan("fiddler", mixtral, hw, W, "uniform")
    back = load_plan(save_plan(plan, mixtral, tmp_path / "f.json"), mixtral)
    a = simulate(mixtral, hw, plan, W, "uniform", record=False)
    b = simulate(mixtral, hw, back, W, "uniform", record=False)
    assert a.step_s == b.step_s and a.busy_s == b.busy_s


def test_numpy_values_in_meta_are_written_as_numbers(tmp_path, mixtral):
    plan = replace(parse_plan("ngl:2", mixtral), meta={"share": np.array([[0.25, 0.75]]), "n": np.int64(3),
                                                         "x": np.float64(0.5), "t": (1, 2)})
    back = load_plan(save_plan(plan, mixtral, tmp_path / "p.json"), mixtral)
    assert back.meta == {"share": [[0.25, 0.75]], "n": 3, "x": 0.5, "t": [1, 2]}  # a tuple comes back a list
    assert type(back.meta["n"]) is int


def test_saving_a_plan_of_another_model_is_refused(tmp_path, mixtral):
    with pytest.raises(PlanError, match="plan ngl:4: llama-2-7b has no block 'L0.router'"):
        save_plan(parse_plan("ngl:4", mixtral), load_spec("llama-2-7b"), tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_a_float_number_of_rows_is_refused_when_saving(tmp_path, mixtral):
    plan = Plan("mine", {"L0.expert0": 7.5}, (False,) * 32)
    with pytest.raises(PlanError, match="gg_rows must be whole numbers"):
        plan_to_dict(plan, mixtral)


# ---- refusals ------------------------------------------------------------------------------------------------

def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _gg(block, rows):
    return lambda d: d["gg_rows"].__setitem__(block, rows)


@pytest.mark.parametrize("edit, message", [
    (_set("version", 2), "format version 2; this offloadkit reads version 1"),
    (_set("gg_row", {}), "unknown key 'gg_row' (a plan file has format, version, model"),
    (lambda d: d.pop("serial"), "'serial' is missing"),
    (_set("model", "llama-2-7b"), "made for 'llama-2-7b', not 'mixtral-8x7b'; make one for mixtral-8x7b with "
                                  "offloadkit plan --model mixtral-8x7b --out PATH.json"),
    (_gg("L40.expert0", 10), "mixtral-8x7b has no block 'L40.expert0' ("),
    (_gg("L3.exper5", 10), "mixtral-8x7b has no block 'L3.exper5' (did you mean 'L3.expert5'?"),
    (_gg("L0.expert0", 20000), "gg_rows['L0.expert0'] is 20000, more than the block has: 14336 rows"),
    (_gg("L0.router", 2), "gg_rows['L0.router'] is 2, more than the block has: 1 (a block that is never split"),
    (_gg("L0.expert0", -128), "gg_rows['L0.expert0'] is -128, negative; rows resident must be 0..14336"),
    (_gg("L0.expert0", 1.5), "gg_rows['L0.expert0'] must be a whole number of rows, got 1.5"),
    (_gg("L0.expert0", True), "gg_rows['L0.expert0'] must be a whole number of rows, got True"),
    (lambda d: d["kv_on_gpu"].pop(), "kv_on_gpu has 31 entries but mixtral-8x7b has 32 layers"),
    (_set("kv_on_gpu", [1] * 32), "kv_on_gpu must be a list of true/false"),
    (_set("assign", "greedy"), "unknown assign rule 'greedy'; the rules are cpu, threshold, fiddler, balance"),
    (_set("assign", "cpu"), "stream_min_tokens goes with the threshold rule, but assign is 'cpu'"),
    (_set("stream_min_tokens", None), "the threshold rule needs stream_min_tokens"),  # Plan's own check
    (_set("staging_buffers", 0), "staging_buffers must be an integer >= 1, got 0"),
    (_set("ubatch", 0), "ubatch must be an integer >= 1 or null, got 0"),
    (_set("pinned", "yes"), "pinned must be true or false, got 'yes'"),
    (_set("policy", ""), "policy must name who made the plan"),
    (_set("meta", []), "meta must be a JSON object, got list"),
    (_set("meta", {"chunk": 0}), "meta chunk (the row chunk of the token assignment) must be an integer >= 1"),
    (_set("gg_rows", [["L0.expert0", 1]]), "gg_rows must be an object of block name -> rows"),
])
def test_bad_plan_files_are_refused_in_one_line(tmp_path, mixtral, edit, message):
    data = plan_to_dict(parse_plan("ngl:4", mixtral), mixtral)  # a llama.cpp plan: assign threshold
    data = json.loads(json.dumps(data))
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError) as e:
        load_plan(path, mixtral)
    assert str(e.value).startswith(f"plan file {path}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON (line 1, column 2"),
    ('{"format": "offloadkit-plan", "version": NaN}', "not valid JSON (NaN is not a number JSON allows)"),
    ("[1, 2]", 'not an offloadkit plan (a plan file is a JSON object with "format": "offloadkit-plan"'),
    ('{"gg_rows": {}}', "not an offloadkit plan"),
    (b"\xff\xfe{", "cannot read it"),
])
def test_files_that_are_not_plans_are_refused(tmp_path, mixtral, text, message):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PlanError) as e:
        load_plan(path, mixtral)
    assert str(e.value).startswith(f"plan file {path}: {message}")


def test_missing_and_unreadable_files(tmp_path, mixtral):
    with pytest.raises(PlanError, match=r"no such file \(write one with offloadkit plan --out"):
        load_plan(tmp_path / "none.json", mixtral)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(PlanError, match="dir.json: cannot read it"):
        load_plan(tmp_path / "dir.json", mixtral)


# ---- --plan on the command line ----------------------------------------------------------------------------

def test_resolve_plan_delegates_the_built_in_forms_and_reads_json(tmp_path, mixtral):
    for text in ("all-cpu", "all-gpu", "ngl:4", "ngl:99"):
        assert_same_plan(resolve_plan(text, mixtral), parse_plan(text, mixtral))
    with pytest.raises(PlanError, match="ngl:N takes N >= 0"):
        resolve_plan("ngl:-1", mixtral)  # parse_plan's own message
    plan = replace(parse_plan("ngl:4", mixtral), label="mine")
    assert_same_plan(resolve_plan(str(save_plan(plan, mixtral, tmp_path / "mine.json")), mixtral), plan)


@pytest.mark.parametrize("text", ["ngl8", "plan.JSON", "mine", ""])
def test_resolve_plan_refuses_other_forms(text, mixtral):
    with pytest.raises(PlanError) as e:
        resolve_plan(text, mixtral)
    assert str(e.value) == (f"unknown plan {text!r}: the plans are all-cpu, all-gpu, ngl:N (N decoder layers on the "
                            f"GPU, e.g. ngl:8) or a plan file PATH.json (written by offloadkit plan --out)")
