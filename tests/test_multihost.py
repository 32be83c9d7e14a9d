"""A real multi-process run: 2 processes x 4 CPU devices joined by
jax.distributed (gloo collectives) train the same config as 1 process x 8
devices to the same losses; killed after a checkpoint, the 2-process run
resumes on the same loss curve; processes that disagree on the config stop
before training."""

import json
import os
import socket

import pytest

from fresh_process import result, start_on_cpu_devices
from train import configs
from trainer_fixtures import cache_env, compile_cache, tiny_config  # noqa: F401

STEPS, KILL_AT = 8, 4
TIMEOUT = 240

# argv: the step after whose (complete) checkpoint the process SIGKILLs
# itself (0: never), then `mixerlab` arguments.
CHILD = """
import os, signal, sys
from train import cli
from train.trainer.checkpoint import Checkpointer
kill_at, argv = {kill_at}, {argv!r}
if kill_at:
  save = Checkpointer.save
  def save_then_die(self, step, *args):
    save(self, step, *args)
    if step == kill_at:
      self.wait()
      from jax.experimental import multihost_utils  # both are past the save
      multihost_utils.sync_global_devices("saved")
      os.kill(os.getpid(), signal.SIGKILL)
  Checkpointer.save = save_then_die
code = cli.main(argv)
print("RESULT", code, flush=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(config: str, run_dir: str, processes: int, env: dict, kill_at: int = 0,
           overrides=None):
  """`processes` processes of `mixerlab train` over 8 CPU devices in all;
  `overrides[i]`: process i's config overrides."""
  port = free_port()
  procs = []
  for i in range(processes):
    flags = [] if processes == 1 else [
        "--coordinator", f"localhost:{port}", "--num-processes", str(processes),
        "--process-id", str(i)]
    argv = ["train", "--config", config, f"train.run_dir={run_dir}",
            *(overrides[i] if overrides else []), *flags]
    code = CHILD.format(kill_at=kill_at, argv=argv)
    procs.append(start_on_cpu_devices(code, 8 // processes, env))
  return procs


def losses(run_dir: str) -> dict[int, float]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture
def config(tmp_path):
  cfg = tiny_config(str(tmp_path / "unused"), steps=STEPS, checkpoint_every=KILL_AT)
  cfg = configs.replace(cfg, model={"n_layers": 1})  # compiles take most of the time
  return configs.save(cfg, str(tmp_path))


def test_two_processes_match_one_and_resume_after_kill(tmp_path, config, compile_cache):
  env = {**cache_env(compile_cache), "JAX_PLATFORMS": "cpu"}
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  ref = launch(config, one, 1, env)
  killed = launch(config, two, 2, env, kill_at=KILL_AT)
  for p in killed:  # the second to go may first see the coordinator die and abort
    out = p.communicate(timeout=TIMEOUT)[0]
    assert p.returncode in (-9, -6) and "RESULT" not in out, out
  assert result(ref[0], TIMEOUT) == 0
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == [str(KILL_AT)]
  assert max(losses(two)) == KILL_AT

  resumed = launch(config, two, 2, env)
  outputs = [p.communicate(timeout=TIMEOUT)[0] for p in resumed]
  assert [p.returncode for p in resumed] == [0, 0], outputs
  assert "mesh data=8 x fsdp=1 x expert=1 x sequence=1 x tensor=1 over 8 cpu devices in 2 process(es)" in outputs[0]
  assert "mesh" not in outputs[1]  # only process 0 prints and logs

  want, got = losses(one), losses(two)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], abs=1e-5), step
  with open(os.path.join(two, "metrics.jsonl")) as f:
    assert any(json.loads(l).get("event") == "resume" and json.loads(l)["step"] == KILL_AT
               for l in f)


def test_processes_that_disagree_on_the_config_stop(tmp_path, config):
  procs = launch(config, str(tmp_path / "run"), 2, {**os.environ, "JAX_PLATFORMS": "cpu"},
                 overrides=[["optimizer.lr=0.01"], ["optimizer.lr=0.02"]])
  for p in procs:
    out = p.communicate(timeout=TIMEOUT)[0]
    assert "RESULT 2" in out, out
    assert "the 2 processes disagree on the config: process(es) [1]" in out, out
    assert "lr: 0.01" in out and "lr: 0.02" in out, out
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_cluster_flags_are_checked_and_the_environment_detected(tmp_path):
  from train.distributed import Cluster, detect, tpu_chips_present
  for flags, match in [(("h:1", None, None), "without --num-processes, --process-id"),
                       (("h", 2, 0), "must be HOST:PORT"),
                       (("h:1", 0, 0), "--num-processes=0 must be >= 1"),
                       (("h:1", 2, 2), r"--process-id=2 must be in \[0, --num-processes=2\)")]:
    with pytest.raises(configs.ConfigError, match=match):
      Cluster(*flags)
  assert detect(Cluster("h:1", 2, 1), {}) == "explicit"
  slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
  assert detect(Cluster(), slurm) == "slurm"
  assert detect(Cluster(), {**slurm, "SLURM_NTASKS": "1"}) in (None, "tpu")
  (tmp_path / "0000:00:04.0").mkdir()
  (tmp_path / "0000:00:04.0" / "vendor").write_text("0x8086\n")
  assert not tpu_chips_present(str(tmp_path))
  (tmp_path / "0000:00:05.0").mkdir()
  (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
  assert tpu_chips_present(str(tmp_path))


def test_cli_rejects_partial_cluster_flags(tmp_path, config, capsys):
  from train import cli
  assert cli.main(["train", "--config", config, "--process-id", "1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("mixerlab train: error: multi-host flags ['process_id'] given "
                        "without --coordinator, --num-processes")
