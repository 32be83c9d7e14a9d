"""Benchmarks: exponent fit, a tiny attention run, a reproducible command."""

import dataclasses
import json
import os
import shlex

import numpy as np
import pytest

from train.bench import mixers as bench
from train import cli


@pytest.mark.parametrize("k", [1.0, 2.0, 1.5])
def test_fit_exponent_recovers_power_law_in_range(k):
  Ls = [256, 512, 1024, 2048, 4096, 8192]
  noise = np.random.default_rng(0).uniform(0.97, 1.03, len(Ls))
  ts = [3e-6 * L**k * n for L, n in zip(Ls, noise)]
  ts[0] = ts[1]  # overhead-bound short lengths lie outside the fit range
  assert bench.fit_exponent(Ls, ts, 1024, 8192) == pytest.approx(k, abs=0.05)
  assert bench.fit_exponent(Ls, ts, 8192, 16384) is None  # one point: no fit


def test_spec_checks_and_command_reproduces_spec():
  with pytest.raises(ValueError, match="tokens=64 must be >= the largest length 128"):
    bench.BenchSpec(lengths=(64, 128), tokens=64, fit=(64, 128))
  with pytest.raises(ValueError, match="at least two"):
    bench.BenchSpec(lengths=(64, 128), tokens=128, fit=(256, 512))
  with pytest.raises(ValueError, match="batch must be >= 0"):
    bench.BenchSpec(batch=-1)
  one = bench.BenchSpec(lengths=(64, 128), tokens=64, fit=(64, 128), batch=1)
  assert [bench.batch_size(one, L) for L in (64, 128)] == [1, 1]
  spec = bench.BenchSpec(mixers=("attention",), d_model=16, lengths=(16, 32),
                         tokens=64, contexts=(8, 16), fit=(16, 32), repeats=1,
                         decode_steps=3,
                         batch=2)
  argv = shlex.split(bench.command(spec))[1:]
  args = cli.parser().parse_args(argv)
  fields = {k: getattr(args, k) for k in bench.BenchSpec.__dataclass_fields__}
  assert bench.BenchSpec(**fields) == spec


def test_attention_tiny_bench_writes_json_table_plot(tmp_path):
  # one decode context: each one costs two compiles (prefill, 1-token step)
  spec = bench.BenchSpec(mixers=("attention",), d_model=16, lengths=(16, 32),
                         tokens=64, contexts=(8,), fit=(16, 32), repeats=1, decode_steps=2,
                         out=str(tmp_path))
  report = bench.run(spec, bench.command(spec), log=lambda _: None)
  [m] = report["mixers"]
  assert "error" not in m, m.get("traceback")
  assert [t["batch"] for t in m["train"]] == [4, 2]
  assert all(t["fwd_s"] > 0 and t["fwd_bwd_s"] > 0 and t["temp_bytes"] > 0 for t in m["train"])
  assert m["time_exponent"] is not None and m["decode"][0]["s_per_token"] > 0
  assert m["decode_ratio"] is None  # needs two contexts; blank, not invented
  # attention's score matrix makes temp memory per sequence grow faster than L
  assert m["memory_exponent"] > 1.2
  saved = json.load(open(tmp_path / "bench.json"))
  assert saved["environment"]["command"].startswith("mixerlab bench --mixers attention")
  md = open(tmp_path / "bench.md").read()
  assert "| attention | " in md and "reproduce: `mixerlab bench" in md
  assert os.path.getsize(tmp_path / "bench.png") > 10_000


def test_medians_in_turns_alternates_calls():
  order = []
  t = bench.medians_in_turns({"a": lambda: order.append("a"),
                              "b": lambda: order.append("b")}, rounds=3)
  assert order == ["a", "b"] * 3 and set(t) == {"a", "b"}


def test_targets_mark_claims_kept_and_missed():
  fit = (2048, 16384)
  assert bench.expected_exponent("n log n", *fit) == pytest.approx(1.116, abs=1e-3)
  base = {"train_cost": "linear", "decode_state": "constant",
          "time_exponent": 1.05, "memory_exponent": 1.0, "decode_ratio": 1.1}
  assert bench.targets(base, fit) == {
      "expected": 1.0, "exp_limit": 1.2, "decode_limit": 1.2,
      "time_ok": True, "memory_ok": True, "decode_ok": True}
  slow = base | {"time_exponent": 1.9, "decode_ratio": 3.0}
  t = bench.targets(slow, fit)
  assert (t["time_ok"], t["memory_ok"], t["decode_ok"]) == (False, True, False)
  # quadratic cost and a growing cache set no target; missing figures neither
  dense = base | {"train_cost": "quadratic", "decode_state": "length", "decode_ratio": None}
  t = bench.targets(dense, fit)
  assert (t["time_ok"], t["decode_ok"], t["exp_limit"]) == (None, None, None)


def test_rerun_resumes_from_written_report(tmp_path):
  spec = bench.BenchSpec(mixers=("attention", "s4d"), d_model=16, lengths=(16, 32),
                         tokens=64, contexts=(8,), fit=(16, 32), repeats=1, decode_steps=2,
                         out=str(tmp_path))
  first = bench.run(spec, bench.command(spec), log=lambda _: None)
  logs = []
  second = bench.run(spec, bench.command(spec), log=logs.append)
  assert second["mixers"] == json.loads(json.dumps(first["mixers"], default=str))
  assert logs == [f"bench attention: kept from {tmp_path}/bench.json",
                  f"bench s4d: kept from {tmp_path}/bench.json"]
  # a different spec measures again rather than mixing conditions
  other = dataclasses.replace(spec, mixers=("s4d",), repeats=2)
  logs.clear()
  bench.run(other, bench.command(other), log=logs.append)
  assert logs[0] == "bench s4d"
