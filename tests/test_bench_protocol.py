"""``offloadkit bench``'s protocol: the tests it runs, the alternation, the ratios, the table and the CLI's refusals.

Speed itself is never asserted here (that is what the benchmark is for); what is checked is that the
protocol measures what it says: the right forwards (counted by a wrapped engine), the alternated order
(seen by a fake llama-bench that logs its calls), ratios computed from the paired samples, and labels.
"""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import pytest
import torch

from offloadkit.bench.protocol import BenchSettings, OffloadkitRunner, format_markdown, open_bench_model, run_bench
from offloadkit.bench.results import BenchRow, BenchRun, Ratio
from offloadkit.cli import main
from offloadkit.errors import BenchError
from offloadkit.model.writer import make_config, write_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    config = make_config("mixtral", layers=2, hidden=64, heads=4, kv_heads=2, experts=4, top_k=2, vocab=300,
                         dtype="float32")
    return write_checkpoint(tmp_path_factory.mktemp("bench") / "tiny-moe", config, seed=3)


class CountingEngine:
    """Wraps the CPU engine and records the shape of every forward and the logits it was asked for."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def new_cache(self, *a, **k):
        return self.engine.new_cache(*a, **k)

    def forward(self, ids, cache, **kw):
        self.calls.append((tuple(ids.shape), cache.length, kw.get("logits")))
        return self.engine.forward(ids, cache, **kw)


def test_runner_runs_llama_bench_tests(tiny):
    runner = OffloadkitRunner(open_bench_model(str(tiny), "float32", progress=False))
    counting = CountingEngine(runner.engine)
    runner.engine = counting
    runner.run_once(12, 0)
    assert counting.calls == [((1, 12), 0, "last")]  # pp12: one prompt forward on an empty cache
    counting.calls.clear()
    runner.run_once(0, 4)  # tg4: four one-token forwards from an empty context
    assert counting.calls == [((1, 1), i, "last") for i in range(4)]
    counting.calls.clear()
    runner.warm_up(0, 4)
    assert counting.calls == [((1, 1), 0, "last")]


def test_last_logits_equal_the_full_forwards_last_row(tiny):
    runner = OffloadkitRunner(open_bench_model(str(tiny), "float32", progress=False))
    ids = runner.random_ids(9)
    full = runner.engine.forward(ids, runner.engine.new_cache(1, 9))
    last = runner.engine.forward(ids, runner.engine.new_cache(1, 9), logits="last")
    assert last.shape[-2] == 1
    # the same f32 hidden state times the same head; only the kernel path (one row vs many) may change the
    # summation order of 64 products: a few ulps of values of order 1
    torch.testing.assert_close(last[0, -1], full[0, -1], rtol=1e-5, atol=1e-5)


def test_offloadkit_only_run(tiny):
    settings = BenchSettings(models=[str(tiny)], dtypes=["f32"], threads=[1], n_prompt=[8], n_gen=[3],
                             repetitions=2, engines=("offloadkit",), profile=None)
    run = run_bench(settings, progress=False)
    assert [r.test for r in run.rows] == ["pp8", "tg3"]
    assert all(len(r.samples_ts) == 2 and r.avg_ts > 0 and r.engine == "offloadkit" for r in run.rows)
    assert run.ratios == [] and len(run.read_gbps) == 2 * 2 * 2  # before and after each round, two tests
    assert set(run.timelines) == {"prefill", "decode"}
    assert run.timelines["prefill"]["source"] == "measured"
    table = format_markdown(run)
    assert "| tiny-moe |" in table and "pp8" in table and "tg3" in table and "measured on" in table
    again = BenchRun.from_dict(json.loads(json.dumps(run.to_dict())))
    assert [r.samples_ts for r in again.rows] == [r.samples_ts for r in run.rows]


def _fake_llamacpp(folder: Path, log: Path, ts: float) -> Path:
    """A llama-bench that logs each call and prints llama-bench's JSON with ``ts`` tokens/s."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "llama-bench"
    template = Path(__file__).parent / "data" / "llama_bench_tiny_mixtral.json"  # a real llama-bench output
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import json, sys, time
        args = sys.argv[1:]
        get = lambda f: args[args.index(f) + 1]
        open({str(log)!r}, "a").write(json.dumps({{"t": time.time(), "args": args}}) + "\\n")
        rec = json.load(open({str(template)!r}))[0]
        rec.update(model_filename=get("-m"), n_threads=int(get("-t")), n_prompt=int(get("-p")),
                   n_gen=int(get("-n")), avg_ts={ts}, stddev_ts=0.0, samples_ts=[{ts}], samples_ns=[1000])
        print(json.dumps([rec]))
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    for extra in ("llama-simple", "llama-completion"):
        (folder / extra).write_text("#!/bin/sh\nexit 1\n")
        (folder / extra).chmod(0o755)
    return folder


def test_alternation_and_ratios(tiny, tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(_fake_llamacpp(tmp_path / "bin", log, ts=50.0)))
    monkeypatch.setenv("OFFLOADKIT_CACHE", str(tmp_path / "cache"))
    order: list[str] = []
    real = OffloadkitRunner.run_once

    def logged(self, n_prompt, n_gen):
        order.append("offloadkit")
        return real(self, n_prompt, n_gen)

    monkeypatch.setattr(OffloadkitRunner, "run_once", logged)
    monkeypatch.setattr("offloadkit.bench.protocol._read_gbps", lambda: order.append("read") or 1.0)
    import offloadkit.bench.llamacpp as lc

    real_lb = lc.run_llama_bench
    monkeypatch.setattr(lc, "run_llama_bench", lambda *a, **k: order.append("llama.cpp") or real_lb(*a, **k))
    settings = BenchSettings(models=[str(tiny)], dtypes=["f32"], threads=[1], n_prompt=[6], n_gen=[0],
                             repetitions=3, profile=None, timelines=False, require_llamacpp=True)
    run = run_bench(settings, progress=False)
    # warm-up, then rounds alternate who goes first, each pair between two memory reads
    assert order == ["offloadkit", "read", "offloadkit", "llama.cpp", "read", "read", "llama.cpp", "offloadkit",
                     "read", "read", "offloadkit", "llama.cpp", "read"]
    calls = [json.loads(line)["args"] for line in log.read_text().splitlines()]
    calls = [args for args in calls if "-m" in args]  # (the build id is asked with --version)
    assert len(calls) == 3
    for args in calls:
        assert args[args.index("-p") + 1] == "6" and args[args.index("-n") + 1] == "0"
        assert args[args.index("-t") + 1] == "1" and args[args.index("-ngl") + 1] == "0"
    ok, ll = run.rows
    assert (ok.engine, ll.engine) == ("offloadkit", "llama.cpp") and ll.samples_ts == [50.0] * 3
    (ratio,) = run.ratios
    assert ratio.ratios == pytest.approx([s / 50.0 for s in ok.samples_ts])
    assert "offloadkit / llama.cpp" in format_markdown(run)


def test_missing_llamacpp_is_skipped_or_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(tmp_path / "nowhere"))
    settings = BenchSettings(models=[str(tiny)], dtypes=["f32"], threads=[1], n_prompt=[4], n_gen=[0],
                             repetitions=1, profile=None, timelines=False)
    run = run_bench(settings, progress=False)
    assert [r.engine for r in run.rows] == ["offloadkit"]
    assert any("make bench" in s for s in run.meta["skipped"])
    assert "make bench" in format_markdown(run)
    settings.require_llamacpp = True
    with pytest.raises(BenchError, match="make bench"):
        run_bench(settings, progress=False)


@pytest.mark.parametrize(("kw", "match"), [
    ({"engines": ("vllm",)}, "unknown engine"),
    ({"n_prompt": [0], "n_gen": [0]}, "nothing to measure"),
    ({"repetitions": 0}, "repetitions"),
    ({"threads": [0]}, "threads"),
    ({"dtypes": ["int4"]}, "int4"),
])
def test_settings_refused(kw, match):
    with pytest.raises(BenchError, match=match):
        BenchSettings(**kw).check()


def test_stored_dtype_mismatch_is_refused(tiny):
    with pytest.raises(BenchError, match="stores float32"):
        run_bench(BenchSettings(models=[str(tiny)], dtypes=["bf16"], engines=("offloadkit",), profile=None),
                  progress=False)


def test_cli_prints_errors_not_tracebacks(capsys, tiny):
    assert main(["bench", "-m", str(tiny), "--engines", "offloadkit", "-p", "0", "-n", "0"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "-p", "5,x"])
    assert "comma-separated list of integers" in capsys.readouterr().err


def test_cli_table_and_json(tiny, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["bench", "-m", str(tiny), "--dtype", "f32", "--engines", "offloadkit", "-p", "5", "-n", "2",
                 "-r", "2", "-t", "1", "--profile", "none", "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny-moe |" in printed and "pp5" in printed and "tg2" in printed
    run = BenchRun.read_json(out)
    assert [r.test for r in run.rows] == ["pp5", "tg2"] and all(len(r.samples_ts) == 2 for r in run.rows)


def test_row_statistics():
    row = BenchRow("offloadkit", "m", 1, 1, "CPU", 2, "bfloat16", "cpu-only", 512, 0, [10.0, 12.0, 14.0])
    assert row.test == "pp512" and row.avg_ts == pytest.approx(12.0) and row.stddev_ts == pytest.approx(2.0)
    assert Ratio("m", "bfloat16", 2, "pp512", [1.0, 1.2]).mean == pytest.approx(1.1)


def test_measured_profile_follows_the_thread_count(tiny, monkeypatch):
    """With ``profile="measure"`` each thread count's rows are simulated on a profile measured on that many
    threads (one per count, measured once), not on the first one for all."""
    import types

    import numba

    import offloadkit.bench.protocol as protocol
    import offloadkit.hardware.probe as probe

    measured_on: list[int] = []
    monkeypatch.setattr(probe, "measure", lambda **kw: measured_on.append(numba.get_num_threads()) or
                        {"threads": numba.get_num_threads()})
    monkeypatch.setattr(probe, "build_profile", lambda m, name=None: types.SimpleNamespace(name=name, **m))
    monkeypatch.setattr(protocol, "_predict", lambda spec, prof, p, n, engine: (float(prof.threads), prof.name))
    threads = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
    settings = BenchSettings(models=[str(tiny)], dtypes=["f32"], threads=threads, n_prompt=[4], n_gen=[2],
                             repetitions=1, engines=("offloadkit",), profile="measure", timelines=False)
    run = run_bench(settings, progress=False)
    assert measured_on == threads
    assert all(r.sim_ts == r.threads and r.sim_label.endswith(f"-t{r.threads}") for r in run.rows)
