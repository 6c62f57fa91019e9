"""Each benchmark script runs in its tiny configuration and writes well-formed JSON.

No timing is asserted: the numbers depend on the machine. The checks are that
every script runs, and that its JSON has the documented shape, with positive
finite measurements, so a broken benchmark is noticed before someone relies on it.
"""

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from seqjax import native

# Each runs a script in a subprocess (~1.5 min in all): CI runs them after the
# default suite, with the other slow tests.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENVIRONMENT = {"date", "python", "platform", "cpu_count", "jax", "backend", "device"}


# How a script is run: as a file, or through the command line (`seqjax bench`).
PYTHON = "python benchmarks/NAME.py"
SEQJAX_BENCH = "seqjax bench NAME"


def _run(script, tmp_path, *extra, via=PYTHON):
  out = tmp_path / f"{script}.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  command = ([str(BENCH / f"{script}.py")] if via == PYTHON
             else ["-m", "seqjax.cli", "bench", script])
  done = subprocess.run([sys.executable, *command, "--quick", "--out", str(out), *extra],
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert payload["benchmark"] == script
  assert ENVIRONMENT <= set(payload["environment"])
  assert isinstance(payload["config"], dict) and payload["results"]
  return payload, done.stdout


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _spread(s):
  assert set(s) == {"median", "min", "max"}
  assert _positive(s["median"]) and s["min"] <= s["median"] <= s["max"]


def test_peers(tmp_path):
  payload, out = _run("peers", tmp_path)
  rows = [r for r in payload["results"] if "contender" in r]
  ratios = [r for r in payload["results"] if "vs" in r]
  # On CPU every contender but JAX's cuDNN LSTM runs.
  assert {r["contender"] for r in rows} == {"seqjax", "seqjax_xla", "torch", "flax", "keras"}
  assert payload["config"]["backend"] == "cpu"
  assert payload["config"]["seqjax_native"] == native.status()  # the inference kernels, or why not
  assert payload["config"]["contenders"] == ["seqjax", "seqjax_xla", "torch", "flax", "keras"]
  assert payload["config"]["precision"]["torch_float32_matmul_precision"] == "highest"
  assert payload["config"]["fused_loop_unroll"] == 1  # CPU: one step a loop iteration
  # Every contender runs with freed memory kept for reuse where the C library allows it.
  assert payload["config"]["reuse_freed_memory"] == (platform.libc_ver()[0] == "glibc")
  assert {(r["cell"], r["mode"]) for r in rows} == {
      (c, m) for c in ("lstm", "gru") for m in ("train", "infer")}
  for r in rows:
    _spread(r["tokens_per_s"])
    _spread(r["gflops"])
    _spread(r["fraction_of_peak"])
    assert len(r["rounds"]) == payload["config"]["rounds"]
  # The matmul peak is timed in every group's rounds; the row's GFLOP/s is
  # tokens/s times the layer's matmul FLOPs per token.
  peaks = [r for r in payload["results"] if "peak_matmul" in r]
  assert len(peaks) == 4 and all(r["peak_matmul"] == 64 for r in peaks)
  for r in peaks:
    _spread(r["gflops"])
  lstm_train = next(r for r in rows if r["cell"] == "lstm" and r["mode"] == "train")
  # D = H = 8, G = 4: forward and weight gradients 2 (D + H) G H each, the
  # carry gradient 2 H G H; not the input gradient, which the step does not need.
  assert lstm_train["gflops"]["median"] == pytest.approx(
      lstm_train["tokens_per_s"]["median"] * (2 * 2 * (8 + 8) * 4 * 8 + 2 * 8 * 4 * 8) / 1e9)
  assert len(ratios) == 4 * 4  # four peers, for each cell and mode
  for r in ratios:
    _spread(r["ratio"])
  assert "| LSTM | (q) B4 T16 D=H=8 | train |" in out  # the README table
  assert "% of matmul peak: seqjax, torch |" in out
  # The cores' FMA ceiling, timed in the same rounds: every contender's
  # fraction of it, and the fraction seqjax would run at TARGET times a peer.
  assert payload["config"]["fma_ceiling"] == "timed in every round"
  assert payload["config"]["target"] == 1.25
  for r in peaks:
    _spread(r["ceiling_gflops"])
    assert len(r["ceiling_rounds"]) == payload["config"]["rounds"]
  for r in rows:
    _spread(r["fraction_of_ceiling"])
  peers = _bench_module("peers")
  for r in ratios:
    # Round by round: 1.25 times the peer's matmul rate, over the ceiling.
    peer = next(p for p in rows if (p["cell"], p["mode"], p["contender"]) ==
                (r["cell"], r["mode"], r["vs"]))
    ceiling = next(p for p in peaks if (p["cell"], p["mode"]) == (r["cell"], r["mode"]))
    flops = peers.flops_per_token(r["cell"], dict(D=8, H=8), r["mode"])
    want = [1.25 * x * flops / (c * 1e9) for x, c in zip(peer["rounds"], ceiling["ceiling_rounds"])]
    assert r["ceiling_at_target"] == pytest.approx(
        dict(median=statistics.median(want), min=min(want), max=max(want)), rel=1e-9)
  assert "% of FMA ceiling: seqjax, torch (1.25× torch) |" in out


def test_paired_ratios_are_taken_round_by_round():
  """common.paired: the spread of each round's ratio, not the medians' ratio;
  rounds that do not pair up are refused."""
  common = _bench_module("common")
  # medians 3 and 2 (1.5), but the rounds' ratios are 1/2, 4 and 1
  assert common.paired([1, 4, 3], [2, 1, 3]) == dict(median=1.0, min=0.5, max=4.0)
  assert common.paired([1, 4, 3], [2, 1, 3], scale=10) == dict(median=10.0, min=5.0, max=40.0)
  with pytest.raises(ValueError):
    common.paired([1, 2, 3], [1, 2])


def test_fma_ceiling_runs_on_every_thread_or_says_why_not(monkeypatch):
  """common.fma_ceiling_run builds fma_ceiling.cc as the kernels are built and
  returns a call and the FLOPs it does: 2 per lane of each of 12 chains, per
  iteration, on each thread; with no compiler, one line saying so."""
  common = _bench_module("common")
  lanes = 16 if "avx512f" in native._cpu_flags() else 1  # floats a multiply-add (at least 1)
  for threads in (1, 2):
    run, flops = common.fma_ceiling_run(threads, seconds=0.002)
    assert _positive(flops) and flops % (2 * 12 * lanes * threads) == 0
    run()
  monkeypatch.setattr(native, "_compiler", lambda: None)
  assert common.fma_ceiling_run(2) == (
      "no C++ compiler found ($CXX, g++ or c++) to build benchmarks/fma_ceiling.cc")


def test_peers_table_replaces_only_its_block(tmp_path):
  common = _bench_module("common")
  page = tmp_path / "README.md"
  page.write_text("before\n<!-- peers:start -->\nold\n<!-- peers:end -->\nafter\n")
  common.replace_between_markers(page, "peers", "| new |")
  assert page.read_text() == "before\n<!-- peers:start -->\n| new |\n<!-- peers:end -->\nafter\n"
  with pytest.raises(ValueError, match="no <!-- other:start -->"):
    common.replace_between_markers(page, "other", "x")


def test_scan_vs_unroll(tmp_path):
  payload, _ = _run("scan_vs_unroll", tmp_path)
  rows = payload["results"]
  assert {r["cell"] for r in rows} == {"elman", "lstm", "gru"}
  assert {r["method"] for r in rows} == {"scan", "unroll"}
  for r in rows:
    for key in ("forward_s", "train_s", "forward_compile_s", "train_compile_s",
                "forward_tokens_per_s", "train_tokens_per_s"):
      assert _positive(r[key]), (key, r)
  assert payload["config"]["reuse_freed_memory"] == (platform.libc_ver()[0] == "glibc")
  assert payload["config"]["fused_loop_unroll"] == 1  # CPU: one step a loop iteration
  for name in ("scan_vs_unroll_time.png", "scan_vs_unroll_compile.png"):
    assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sampling(tmp_path, cell):
  payload, _ = _run("sampling", tmp_path, "--cell", cell)
  assert payload["config"]["cell"] == cell
  rows = [r for r in payload["results"] if "variant" in r]
  assert {r["cell"] for r in rows} == {cell}
  batches = payload["config"]["batches"]
  variants = ["plain", "table", "table_bf16", "table_int8"]
  if payload["config"]["seqjax_native"] == "ready":
    variants += ["native"] + ["native_bf16"] * bool(native._bf16("bfloat16"))
    variants += ["native_int8"] * bool(native._int8("int8"))
  assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in variants for b in batches}
  for r in rows:
    for key in ("tokens_per_s", "gflops", "fraction_of_peak", "weight_gb_per_s"):
      _spread(r[key])
    assert 0.0 <= r["same_tokens"] <= 1.0
    if r["variant"] in ("table", "native", "native_bf16", "native_int8"):  # reordered sums
      assert r["same_tokens"] == 1.0
  peaks = [r for r in payload["results"] if "peak_matmul" in r]
  assert sorted(r["batch"] for r in peaks) == sorted(batches)
  for r in peaks:
    _spread(r["gflops"])
  # plain multiplies by the input projection too; table gathers a row instead.
  plain, table = (next(r for r in rows if r["variant"] == v and r["batch"] == 1)
                  for v in ("plain", "table"))
  h, e, v = plain["H"], plain["embed"], plain["vocab"]
  g = {"lstm": 4, "gru": 3}[cell]
  assert plain["gflops"]["median"] == pytest.approx(
      plain["tokens_per_s"]["median"] * 2 * (g * h * h + h * v + g * e * h) / 1e9)
  assert table["gflops"]["median"] == pytest.approx(
      table["tokens_per_s"]["median"] * 2 * (g * h * h + h * v) / 1e9)


@pytest.mark.parametrize("via", [PYTHON, SEQJAX_BENCH])
def test_vanishing_gradients(tmp_path, via):
  payload, _ = _run("vanishing_gradients", tmp_path, via=via)
  curves = [r for r in payload["results"] if "cell" in r]
  assert {(r["cell"], r["stage"]) for r in curves} == {
      (c, s) for c in ("elman", "lstm", "gru") for s in ("init", "trained")}
  for r in curves:
    assert len(r["grad_norm_by_step"]) == payload["config"]["T"]
    assert all(math.isfinite(g) and g >= 0 for g in r["grad_norm_by_step"])
  scalar = payload["results"][-1]["scalar"]
  assert len(scalar["w"]) == len(scalar["h_T"]) == len(scalar["dh_T_dh_0"])
  for name in ("vanishing_gradients.png", "scalar_recurrence.png"):
    assert (tmp_path / name).stat().st_size > 1000


def test_charlm_curves(tmp_path):
  payload, out = _run("charlm_curves", tmp_path)
  (run,) = payload["results"]
  assert run["label"] == "quick" and run["params"] > 0 and run["step"] == 4
  assert [x["step"] for x in run["curve"]] == [2, 4]
  for x in run["curve"]:
    assert _positive(x["loss"]) and _positive(x["train_time"])
    assert x["train_time"] <= x["wall_time"]
  assert set(run["final"]) == {"validation", "test"}
  assert set(run["first_train_time_at_or_below"]) == {"1.50", "1.40"}
  assert (tmp_path / "charlm_curves.png").stat().st_size > 0
  assert "quick: validation" in out


def test_precision(tmp_path):
  payload, out = _run("precision", tmp_path)
  assert payload["config"]["reuse_freed_memory"] == (platform.libc_ver()[0] == "glibc")
  assert {(r["cell"], r["mode"]) for r in payload["results"]} == {
      (c, m) for c in ("lstm", "gru") for m in ("train", "infer")}
  for r in payload["results"]:
    assert set(r["tokens_per_s"]) == {"float32", "bfloat16", "torch_float32", "torch_bfloat16"}
    for s in r["tokens_per_s"].values():
      _spread(s)
    for ratio in ("speedup", "vs_torch_bfloat16", "torch_speedup"):
      _spread(r[ratio])
    errors = r["relative_error"]
    assert 0 < errors["outputs"] < 0.05
    assert set(errors["gradients"]) >= {"w_x", "w_h", "b"}
    assert all(0 < e < 0.1 for e in errors["gradients"].values())
    torch_errors = r["torch_relative_error"]  # bfloat16 rounds: nonzero, but small
    assert 0 < torch_errors["outputs"] < 0.05
    assert set(torch_errors["gradients"]) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                              "bias_hh_l0"}
    assert all(0 < e < 0.1 for e in torch_errors["gradients"].values())
  assert "bf16/f32" in out
  assert "| GRU | (q) B4 T16 D=H=8 | infer |" in out  # the README table


def test_memory(tmp_path):
  payload, out = _run("memory", tmp_path, "--plots", str(tmp_path / "figures"))
  rows = payload["results"]
  assert {(r["variant"], r["T"]) for r in rows} == {
      (v, t) for v in ("stored", "remat") for t in payload["config"]["steps"]}
  for r in rows:
    plan = r["xla_plan_bytes"]
    assert plan["total"] == plan["arguments"] + plan["outputs"] + plan["temporaries"] > 0
    _spread(r["step_s"])
    assert r["peak_rss_bytes"] >= r["rss_before_step_bytes"] > 0
    assert math.isfinite(r["loss"])
    # Each worker keeps its freed memory for reuse, as seqjax train does.
    assert r["reuse_freed_memory"] == (platform.libc_ver()[0] == "glibc")
  # Same arithmetic: the same loss; at the longer T, a smaller plan with remat.
  by = {(r["variant"], r["T"]): r for r in rows}
  longest = max(payload["config"]["steps"])
  assert by["remat", longest]["loss"] == pytest.approx(by["stored", longest]["loss"], rel=1e-5)
  assert (by["remat", longest]["xla_plan_bytes"]["temporaries"]
          < by["stored", longest]["xla_plan_bytes"]["temporaries"])
  assert (tmp_path / "figures" / "memory.png").stat().st_size > 1000
  assert "| 256 |" in out  # the README table
  assert {r["backend"] for r in rows} == {"cpu"} and "peak RSS" in out
  assert not any("peak_device_bytes" in r for r in rows)


def _bench_module(name):
  sys.path.insert(0, str(BENCH))
  try:
    return __import__(name)
  finally:
    sys.path.remove(str(BENCH))


def test_memory_on_a_gpu_reports_the_device_peak_in_its_own_table():
  memory = _bench_module("memory")
  plan = dict(arguments=1, outputs=1, temporaries=2 ** 30, total=2 ** 30 + 2)
  rows = [dict(variant=v, T=1024, xla_plan_bytes=plan, step_s=dict(median=0.5),
               peak_rss_bytes=7 * 2 ** 30, peak_device_bytes=(2 if v == "stored" else 1) * 2 ** 30,
               backend="gpu") for v in ("stored", "remat")]
  table = memory.markdown(rows)
  assert "stored: peak device memory (XLA plan), GiB" in table and "RSS" not in table
  assert "| 1,024 | 2.00 (1.00) | 0.50 | 1.00 (1.00) | 0.50 | 1.00 |" in table
  assert memory._marker(rows) == "memory_gpu"
  readme = (BENCH / "README.md").read_text()  # --update-readme has a block to write on a GPU
  assert "<!-- memory_gpu:start -->" in readme and "<!-- peers_gpu:start -->" in readme
  cpu_rows = [dict(r, backend="cpu") for r in rows]
  for r in cpu_rows:
    del r["peak_device_bytes"]
  assert memory._marker(cpu_rows) == "memory" and "| 1,024 | 7.00 (1.00) |" in memory.markdown(
      cpu_rows)


def test_peers_on_a_gpu_leaves_out_seqjax_xla_and_keeps_its_own_table(monkeypatch):
  peers = _bench_module("peers")
  assert peers.unavailable("seqjax_xla") is None  # here: the CPU
  monkeypatch.setattr(peers, "backend", lambda: "gpu")
  assert "on gpu seqjax runs the XLA path already" in peers.unavailable("seqjax_xla")
  assert peers.results_name() == "peers_gpu" and peers.results_name("cpu") == "peers"


def test_results_files_are_named_after_the_backend_they_were_measured_on(monkeypatch):
  common, precision = _bench_module("common"), _bench_module("precision")
  results = BENCH / "results"
  assert common.results_path("peers", "gpu") == results / "peers_gpu.json"
  assert common.results_path("memory", "cpu") == results / "memory.json"
  assert common.results_path("precision") == results / "precision.json"  # JAX's backend: CPU
  parser = common.arguments("x", lambda flags: f"x_{flags.cell}")  # named after a flag
  parser.add_argument("--cell", default="gru")
  assert parser.parse_args([]).out == results / "x_gru.json"
  assert parser.parse_args(["--out", "/tmp/y.json"]).out == Path("/tmp/y.json")
  assert common.arguments("x", "x", per_backend=False).parse_args([]).out == results / "x.json"
  assert precision._marker({"backend": "gpu"}) == "precision_gpu"
  assert precision._marker({}) == precision._marker({"backend": "cpu"}) == "precision"
  monkeypatch.setattr(common, "on_backend", lambda name, backend: f"{name}_gpu")  # as on a GPU
  assert common.arguments("x", "peers").parse_args([]).out == results / "peers_gpu.json"


def test_table_from_writes_the_table_of_the_backend_the_json_was_measured_on(tmp_path,
                                                                              monkeypatch):
  common, peers, memory = (_bench_module(n) for n in ("common", "peers", "memory"))
  written = []
  monkeypatch.setattr(common, "replace_between_markers",
                      lambda path, marker, text: written.append((marker, text)))
  results = BENCH / "results"
  peers.main(["--table-from", str(results / "peers_gpu.json")])
  peers.main(["--table-from", str(results / "peers.json")])
  memory.main(["--table-from", str(results / "memory.json")])
  plan = dict(arguments=1, outputs=1, temporaries=2 ** 30, total=2 ** 30 + 2)
  rows = [dict(variant=v, T=1024, xla_plan_bytes=plan, step_s=dict(median=0.5),
               peak_rss_bytes=2 ** 30, peak_device_bytes=2 ** 30, backend="gpu")
          for v in ("stored", "remat")]
  saved = tmp_path / "memory_gpu.json"
  saved.write_text(json.dumps({"results": rows}))
  memory.main(["--table-from", str(saved)])
  assert [marker for marker, _ in written] == ["peers_gpu", "peers", "memory", "memory_gpu"]
  assert "| cudnn tok/s" in written[0][1] and "| seqjax_xla tok/s" in written[1][1]
  assert "peak device memory" in written[3][1]


def test_loop_unroll(tmp_path):
  payload, out = _run("loop_unroll", tmp_path, "--unrolls", "1", "3")
  config, rows = payload["config"], payload["results"]
  assert config["unrolls"] == [1, 3] and config["backend"] == "cpu"
  assert config["default_unroll"] == 1
  groups = [r for r in rows if "cell" in r]
  assert {(r["cell"], r["mode"]) for r in groups} == {
      (c, m) for c in ("lstm", "gru") for m in ("train", "infer")}
  for r in groups:
    assert set(r["tokens_per_s"]) == {"1", "3"}
    assert all(_positive(x) for x in r["tokens_per_s"].values())
  gain = rows[-1]["geomean_gain"]
  assert gain["1"] == 1.0 and _positive(gain["3"]) and rows[-1]["relative_to"] == 1
  assert out.strip().splitlines()[-1] in ("BEST 1", "BEST 3")


def test_loop_unroll_times_the_groups_its_flags_pick(tmp_path):
  payload, _ = _run("loop_unroll", tmp_path, "--unrolls", "2", "1", "--cells", "gru",
                    "--modes", "infer")
  groups = [r for r in payload["results"] if "cell" in r]
  assert [(r["cell"], r["mode"]) for r in groups] == [("gru", "infer")]
  assert payload["results"][-1]["relative_to"] == 2


@pytest.mark.parametrize("script", ["peers", "loop_unroll", "kernel_variants"])
@pytest.mark.parametrize("flag,value,unknown", [("--cells", "lstm,lsmt", "'lsmt'"),
                                                ("--modes", "tran", "'tran'"),
                                                ("--sizes", "b,d", "'d'")])
def test_an_unknown_group_name_stops_the_run_with_one_line(script, flag, value, unknown,
                                                           capsys, monkeypatch):
  monkeypatch.setattr(native, "reuse_freed_memory", lambda: False)  # not this process's malloc
  with pytest.raises(SystemExit) as stop:
    _bench_module(script).main([flag, value])
  assert stop.value.code == 2
  assert f"error: {flag}: unknown {unknown}; expected some of" in capsys.readouterr().err


def test_scan_vs_unroll_takes_cells_and_names_its_plots_after_its_json(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = tmp_path / "scan_vs_unroll_gpu.json"
  plots = tmp_path / "figures" / "new"  # --plots may name a folder not made yet
  done = subprocess.run([sys.executable, str(BENCH / "scan_vs_unroll.py"), "--quick", "--cells",
                         "gru", "--out", str(out), "--plots", str(plots)], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert {r["cell"] for r in payload["results"]} == {"gru"} and payload["config"]["cells"] == ["gru"]
  for name in ("scan_vs_unroll_gpu_time.png", "scan_vs_unroll_gpu_compile.png"):
    assert (plots / name).stat().st_size > 1000


def test_call_times(tmp_path):
  payload, out = _run("call_times", tmp_path)
  rows, config = payload["results"], payload["config"]
  settings = ("after_compile", "after_pause", "in_a_row")
  assert {(r["cell"], r["T"], r["setting"]) for r in rows} == {
      (c, t, s) for c in ("lstm", "gru") for t in config["steps"] for s in settings}
  for r in rows:
    calls = config["calls_in_a_row"] if r["setting"] == "in_a_row" else (
        config["compiles"] * config["per_compile"])
    assert r["calls"] == calls
    assert 0 < r["median_ms"] <= r["p90_ms"] <= r["max_ms"] and r["mean_ms"] <= r["max_ms"]
    assert 0 <= r["slow_calls"] < r["calls"]  # over 3x the median: never all of them
  assert config["reuse_freed_memory"] == (platform.libc_ver()[0] == "glibc")
  assert config["seqjax_native"] == native.status()  # without the kernels: the XLA path's calls
  assert "over 3x the median" in out


@pytest.mark.skipif(native.status() != "ready", reason="short_calls.py times the native kernels")
def test_short_calls(tmp_path):
  payload, out = _run("short_calls", tmp_path)
  rows = payload["results"]
  config = payload["config"]
  assert {(r["cell"], r["T"]) for r in rows} == {
      (c, t) for c in ("lstm", "gru") for t in config["steps"]}
  for r in rows:
    for key in ("kernel_tokens_per_s", "xla_tokens_per_s", "kernel_vs_xla"):
      _spread(r[key])
    gates = 4 if r["cell"] == "lstm" else 3  # w_x, w_h, b (and the GRU's b_hn)
    assert r["weights"] == (r["D"] + r["H"] + 1) * gates * r["H"] + (r["cell"] == "gru") * r["H"]
    assert r["rule_picks_kernel"] == (r["T"] >= config["min_steps"] and r["T"] * r["B"]
                                      * config["weights_per_row_step"] >= r["weights"])
  assert config["reuse_freed_memory"] == (platform.libc_ver()[0] == "glibc")
  assert "kernel/XLA" in out


@pytest.mark.skipif(native.status() != "ready", reason="padded_units.py times the native kernels")
def test_padded_units(tmp_path):
  payload, out = _run("padded_units", tmp_path)
  rows = payload["results"]
  config = payload["config"]
  assert [(r["cell"], r["H"], r["mode"]) for r in rows] == [
      (c, h, m) for c in ("lstm", "gru") for h in config["hidden"]
      for m in ("train", "infer", *(f"sample, batch {b}" for b in config["sample_batches"]))]
  for r in rows:
    assert r["H"] % 16 and r["units"] == native.padded_units(r["H"]) == -(-r["H"] // 16) * 16
    assert set(r["tokens_per_s"]) == {"padded", "xla"}
    for s in (*r["tokens_per_s"].values(), r["padded_vs_xla"]):
      _spread(s)
    if r["mode"].startswith("sample"):  # the same noise: the same tokens, ties apart
      assert r["T"] == config["sample_length"] and 0.9 <= r["same_tokens"] <= 1
  assert "| LSTM | 20 (32) | train |" in out and "| GRU | 20 (32) | sample, batch 2 |" in out


@pytest.mark.skipif(native.status() != "ready", reason="row_groups.py times the native kernels")
def test_row_groups(tmp_path):
  payload, out = _run("row_groups", tmp_path, "--sizes", "16,32,16", "10,32,16")
  rows, config = payload["results"], payload["config"]
  assert config["sizes"] == [[16, 32, 16], [10, 32, 16]]
  assert config["sample_sizes"] and "sample" in config["sample_modes"]
  assert {(r["cell"], r["B"], r["H"], r["mode"]) for r in rows} == {
      (c, b, h, m) for c in ("lstm", "gru") for b, h, _ in config["sizes"]
      for m in ("train", "infer")} | {
      (c, b, h, m) for c in ("lstm", "gru") for b, h, _ in config["sample_sizes"]
      for m in config["sample_modes"]}
  for r in rows:
    for split in ("units", "rows"):
      _spread(r["tokens_per_s"][split])
    _spread(r["rows_vs_units"])
    # The weights the kernel calls asked the rule about, as the kernels read them.
    gates = 4 if r["cell"] == "lstm" else 3
    if r["mode"].startswith("sample"):  # w_h and the read-out (65 symbols)
      assert r["weights"] == {"sampler": gates * r["H"] ** 2 + r["H"] * 65}
    elif r["mode"] == "infer":
      assert r["weights"] == {"forward": (r["D"] + r["H"]) * gates * r["H"]}
    else:  # the reverse loop reads w_h alone
      assert r["weights"] == {"forward": (r["D"] + r["H"]) * gates * r["H"],
                              "reverse": r["H"] * gates * r["H"]}
    assert r["rule_picks_rows"] == {loop: native.row_groups(r["B"], w, config["threads"]) > 1
                                    for loop, w in r["weights"].items()}
  assert "| rows / units (range) |" in out


def test_kernel_variants(tmp_path):
  """An unedited copy of rnn.cc gives the kernels' results bit for bit; one
  whose column sums are doubled (the bias gradients) is timed too, and its
  results are reported as differing. The control (the kernels timed again)
  runs beside them, and equals base."""
  source = ROOT / "seqjax" / "native" / "rnn.cc"
  text = source.read_text()
  summing = "sum = _mm512_add_ps(sum, row);"
  assert text.count(summing) == 1
  doubled = tmp_path / "doubled.cc"
  doubled.write_text(text.replace(summing, "sum = _mm512_add_ps(sum, _mm512_add_ps(row, row));"))
  copy = tmp_path / "copy.cc"
  copy.write_text(text)
  payload, out = _run("kernel_variants", tmp_path, f"copy={copy}", f"doubled={doubled}",
                      "--modes", "train,outer_sum", "--cells", "lstm")
  variants = payload["config"]["variants"]
  assert variants["copy"] == {"source": str(copy), "diff": ""}
  changed = [line for line in variants["doubled"]["diff"].splitlines()
             if line[:1] in "+-" and line[:3] not in ("+++", "---")]
  assert [line[0] + line[1:].strip() for line in changed] == [
      "-" + summing, "+sum = _mm512_add_ps(sum, _mm512_add_ps(row, row));"]
  rows = payload["results"]
  assert [(r["cell"], r["mode"]) for r in rows] == [("lstm", "train"), ("lstm", "outer_sum")]
  assert payload["config"]["control"] is True
  for r in rows:
    assert set(r["tokens_per_s"]) == set(r["gflops"]) == {"base", "control", "copy", "doubled"}
    for name in ("base", "control", "copy", "doubled"):
      _spread(r["tokens_per_s"][name])
      _spread(r["gflops"][name])
    for name in ("control", "copy", "doubled"):
      _spread(r["vs_base"][name])
    assert r["equal_to_base"] == {"control": True, "copy": True, "doubled": False}
    assert r["max_abs_difference"]["copy"] == r["max_abs_difference"]["control"] == 0
    assert 0 < r["max_abs_difference"]["doubled"]
  assert "doubled" in out and "differs by up to" in out and "control" in out


def test_kernel_variants_times_a_shape_of_ones_own(tmp_path):
  """--shape B,T,D,H times that size in place of the named ones (here with
  D != H, and a batch the threads split by units); --no-control leaves the
  control out."""
  payload, out = _run("kernel_variants", tmp_path, "--shape", "3,5,48,32", "--cells", "gru",
                      "--modes", "infer", "--no-control")
  assert payload["config"]["control"] is False
  assert payload["config"]["sizes"] == {"B3_T5_D48_H32": dict(B=3, T=5, D=48, H=32)}
  [row] = payload["results"]
  assert (row["size"], row["cell"], row["mode"]) == ("B3_T5_D48_H32", "gru", "infer")
  assert (row["B"], row["T"], row["D"], row["H"]) == (3, 5, 48, 32)
  assert row["equal_to_base"] == {"copy": True}
  assert "gru (B3_T5_D48_H32) infer" in out


@pytest.mark.parametrize("argv,says", [
    (["mine=/no/such/rnn.cc"], "variant 'mine': no source file '/no/such/rnn.cc'"),
    (["--shape", "4,8,32"], "argument --shape: a shape is four positive integers B,T,D,H "
                            "(batch, steps, inputs, hidden units), got '4,8,32'"),
    (["--shape", "4,0,32,32"], "argument --shape: a shape is four positive integers B,T,D,H "
                               "(batch, steps, inputs, hidden units), got '4,0,32,32'"),
    (["base=" + __file__], "a variant is NAME=PATH, NAME made of letters, digits and _ (not "
                           "'base' or 'control')"),
    (["control=" + __file__], "(not 'base' or 'control')"),
    ([], "expected at least one variant, NAME=PATH"),
    (["broken={broken}"], "build_variant: {broken}: ")])
def test_kernel_variants_stops_on_a_bad_variant_with_one_line(argv, says, tmp_path, capsys,
                                                             monkeypatch):
  monkeypatch.setattr(native, "reuse_freed_memory", lambda: False)  # not this process's malloc
  broken = tmp_path / "broken.cc"
  broken.write_text("int broken = ;\n")
  argv, says = [a.format(broken=broken) for a in argv], says.format(broken=broken)
  with pytest.raises(SystemExit) as stop:
    _bench_module("kernel_variants").main(argv)
  assert stop.value.code == 2
  assert says in capsys.readouterr().err


def test_the_environment_records_xla_flags_where_set(monkeypatch):
  common = _bench_module("common")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert "xla_flags" not in common.environment()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
  assert common.environment()["xla_flags"] == "--xla_gpu_enable_command_buffer="
