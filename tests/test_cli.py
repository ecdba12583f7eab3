"""The command line: tables it prints, errors it reports without a traceback (before any work), its help."""

import argparse
import json
import os
import subprocess
import sys

import pytest

import offloadkit
from offloadkit.cli import MAKE_MODEL_SIZES, build_parser, main
from offloadkit.hardware.machine import cpu_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offloadkit.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_info_prints_breakdown(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "46.70 B" in out and "12.88 B" in out
    assert "86.99 GiB" in out


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/model"], "no model named '/no/such/model'"),
    (["info", "not-a-zoo-model"], "mixtral-8x7b"),
])
def test_errors_are_one_line_without_traceback(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("offloadkit: error:") and message in r.stderr


def test_unsupported_architecture_from_cli(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'bert' is not supported" in r.stderr


def test_make_model_then_generate_matches_the_reference(tmp_path, capsys):
    import torch

    from offloadkit.runtime.engines import load_engine

    out = tmp_path / "tiny"
    assert main(["make-model", "--arch", "qwen2_moe", "--out", str(out), "--layers", "2", "--hidden", "32",
                 "--experts", "4", "--vocab", "300", "--seed", "3"]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert f"measured on {cpu_model()}" in printed and "engine: reference" in printed
    model, tok = load_engine("reference", out)
    ids = tok.encode("hi")
    expected = model.greedy(torch.tensor([ids]), 6)[0].tolist()
    stop = next((i for i, t in enumerate(expected) if t in tok.eos_ids), len(expected) - 1)
    assert tok.decode(expected[:stop + 1]) in printed


def test_corrupt_checkpoint_from_cli(tmp_path):
    out = tmp_path / "m"
    assert main(["make-model", "--arch", "llama", "--out", str(out), "--hidden", "32", "--vocab", "300"]) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    r = run_cli("generate", "--model", str(out), "--prompt", "x", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.safetensors" in r.stderr and "truncated" in r.stderr


def test_make_model_rejects_bad_sizes(tmp_path):
    r = run_cli("make-model", "--arch", "mixtral", "--out", str(tmp_path / "x"), "--experts", "2",
                "--top-k", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "exceeds the number of experts" in r.stderr


# ---- output paths are checked before the work -------------------------------------------------------------

SIM = ["simulate", "--prompt", "16", "--gen", "1"]


@pytest.mark.parametrize("args, message", [
    ([*SIM, "--trace", "{tmp}/no/such/dir/x.json"],
     "--trace {tmp}/no/such/dir/x.json: the folder {tmp}/no/such/dir does not exist; create it first"),
    ([*SIM, "--html", "{tmp}"], "--html {tmp}: is a folder; give a file name inside it"),
    ([*SIM, "--trace", "{tmp}/file/x.json"], "--trace {tmp}/file/x.json: {tmp}/file is a file, not a folder"),
    ([*SIM, "--trace", "{tmp}/t.json", "--html", "{tmp}/t.json"], "--trace and --html name the same file"),
    (["profile", "--quick", "--out", "{tmp}/no/p.toml"], "--out {tmp}/no/p.toml: the folder {tmp}/no does not exist"),
    (["make-model", "--arch", "llama", "--out", "{tmp}/file"], "--out {tmp}/file: is a file, not a folder"),
    (["make-model", "--arch", "llama", "--out", "{tmp}/no/m"], "--out {tmp}/no/m: the folder {tmp}/no does not exist"),
    (["kernels", "compile", "--ptx-dir", "{tmp}/file"], "--ptx-dir {tmp}/file: is a file, not a folder"),
])
def test_output_paths_are_refused_before_the_work(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("keep me")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"offloadkit: error: {message.format(tmp=tmp_path)}")
    assert captured.err.count("\n") == 1  # one line
    assert captured.out == ""  # nothing simulated, measured or written
    assert (tmp_path / "file").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_simulate_trace_into_a_missing_folder_from_the_shell(tmp_path):
    r = run_cli("simulate", "--trace", str(tmp_path / "no" / "x.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr == (f"offloadkit: error: --trace {tmp_path}/no/x.json: the folder {tmp_path}/no does not "
                        f"exist; create it first or choose another path\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([*SIM, "--trace", str(locked / "x.json")]) == 2
    finally:
        locked.chmod(0o700)
    assert f"cannot write in the folder {locked} (permission denied)" in capsys.readouterr().err


def test_an_unwritable_folder_is_refused_even_for_root(tmp_path, capsys, monkeypatch):
    """The same refusal where permissions cannot be taken away (a root user): ``os.access`` says no."""
    import offloadkit.output_paths

    monkeypatch.setattr(offloadkit.output_paths.os, "access", lambda path, mode: False)
    assert main([*SIM, "--trace", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err == (f"offloadkit: error: --trace {tmp_path}/x.json: cannot write in the folder "
                                       f"{tmp_path} (permission denied)\n")
    (tmp_path / "x.json").write_text("{}")
    assert main([*SIM, "--trace", str(tmp_path / "x.json")]) == 2
    assert "the file exists and is not writable (permission denied)" in capsys.readouterr().err


# ---- make-model over an existing folder -----------------------------------------------------------------

TINY = ["make-model", "--arch", "llama", "--hidden", "32", "--vocab", "300"]


def test_make_model_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()  # an empty folder is fine
    assert main([*TINY, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*TINY, "--out", str(out), "--seed", "1"]) == 2
    assert capsys.readouterr().err == (f"offloadkit: error: --out {out}: the folder exists and is not empty; pass "
                                       f"--force to overwrite the files this command writes there\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost
    assert main([*TINY, "--out", str(out), "--seed", "1", "--force"]) == 0
    assert "(--force: its checkpoint files replaced those there)" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]


def test_make_model_defaults_are_make_configs():
    import inspect

    from offloadkit.model.writer import make_config

    params = inspect.signature(make_config).parameters
    for flag, (default, _) in MAKE_MODEL_SIZES.items():
        assert params[flag.replace("-", "_")].default == default, flag
    make_model = subcommands(build_parser())["make-model"]
    assert make_model.get_default("dtype") == params["dtype"].default


# ---- plans, routings and --gen 0 on the command line -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--plan", "ngl8"], "unknown plan 'ngl8': the plans are all-cpu, all-gpu, ngl:N"),
    (["--plan", "ngl:-3"], "plan 'ngl:-3': ngl:N takes N >= 0 layers on the GPU"),
    (["--routing", "zipf"], "routing 'zipf' needs its exponent: zipf:S with S >= 0, e.g. zipf:1.2"),
    (["--routing", "popular"], "unknown routing 'popular': the routings are uniform, zipf:S, trace:PATH"),
    (["--gen", "-1"], "--gen must be >= 0, got -1 (--gen 0 simulates the prefill only)"),
    (["--prompt", "0"], "--prompt must be >= 1, got 0"),
])
def test_simulate_refuses_what_it_would_have_to_guess(capsys, args, message):
    assert main([*SIM, *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"offloadkit: error: {message}") and captured.out == ""


def test_ngl_99_means_every_layer_and_says_so(capsys):
    assert main(["simulate", "--plan", "ngl:99", "--prompt", "16", "--gen", "1", "--ignore-memory"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "plan: ngl:99 → all 32 layers + the output layer of mixtral-8x7b (ngl:33), as in llama.cpp"
    assert "plan ngl:33" in out[1]


def test_gen_0_is_prefill_only(capsys):
    assert main(["simulate", "--prompt", "16", "--gen", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert "pp16, batch 1" in out and "\ndecode" not in out
    assert "prefill only (--gen 0, as llama-bench -n 0): no decode step was simulated" in out
    rows = json.loads(out.splitlines()[-1])  # the rows of the default policy's plan: no decode row
    assert [(r["policy"], r["phase"]) for r in rows] == [("scheinfer", "prefill"), ("scheinfer", "overall")]
    assert rows[0]["seconds"] == rows[1]["seconds"] and rows[0]["tokens"] == rows[1]["tokens"] == 16


# ---- generate stops at the model's context --------------------------------------------------------------

@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny llama whose context is 16 positions."""
    from offloadkit.model.writer import make_config, write_checkpoint

    out = tmp_path_factory.mktemp("ctx") / "ctx16"
    return write_checkpoint(out, make_config("llama", hidden=32, vocab=300, max_position_embeddings=16), seed=1)


def test_generate_stops_at_the_context_and_keeps_the_text(short_context, capsys):
    import torch

    from offloadkit.runtime.engines import load_engine

    assert main(["generate", "--model", str(short_context), "--prompt", "hello", "--max-new-tokens", "50"]) == 0
    captured = capsys.readouterr()
    model, tok = load_engine("reference", short_context)
    ids = tok.encode("hello")
    room = 16 - len(ids)
    expected = model.greedy(torch.tensor([ids]), room)[0].tolist()
    assert not any(t in tok.eos_ids for t in expected)  # the context, not an end-of-text, ends it
    assert captured.out.startswith("hello" + tok.decode(expected)) and f": {room} tokens in " in captured.out
    assert captured.err == (f"note: stopped after {room} of the 50 new tokens asked for: the prompt ({len(ids)} "
                            f"tokens) and the text now fill the model's context of 16 positions "
                            f"(max_position_embeddings)\n")


@pytest.mark.parametrize("prompt, message", [
    ("x" * 20, "the prompt is 21 tokens, longer than the model's context of 16 positions (max_position_embeddings)"),
    ("x" * 15, "the prompt is 16 tokens, the model's whole context of 16 positions (max_position_embeddings): "
               "there is no room to generate"),
])
def test_generate_refuses_a_prompt_that_does_not_fit(short_context, prompt, message):
    r = run_cli("generate", "--model", str(short_context), "--prompt", prompt)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith(f"offloadkit: error: {message}")


# ---- help and version ---------------------------------------------------------------------------------

def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its name, ``"hardware show"`` for nested ones; ``""`` is the top."""
    found = {prefix.strip(): parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(subcommands(sub, f"{prefix} {name}"))
    return found


def test_every_option_of_every_subcommand_is_described_with_its_default():
    parsers = subcommands(build_parser())
    assert {"info", "make-model", "generate", "demo", "hardware list", "hardware show", "profile", "simulate",
            "plan", "kernels compile", "bench kernels"} <= parsers.keys()
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        assert parser.description, f"'offloadkit {name} --help' says nothing about the command"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {a.dest for a in action._choices_actions if a.help}
                assert described == set(action.choices), f"{name}: subcommands without help"
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"offloadkit {name} {flag} has no help text"
            shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
            if shown and action.option_strings:
                assert "(default" in formatter._get_help_string(action), f"offloadkit {name} {flag}: default not shown"
    help_text = " ".join(parsers["simulate"].format_help().split())
    assert "(default: 512)" in help_text and "(default: scheinfer; not with --plan)" in help_text
    assert "(default: 0)" in help_text and "(default: none, the policy's plan)" in help_text


def test_version_is_the_packages():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout == f"offloadkit {offloadkit.__version__}\n"
