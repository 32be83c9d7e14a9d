"""A short bf16 soak for the mixers whose recurrences have drifted in bf16
before: STEPS steps on the text task with fp32 and with bf16 compute (fp32
master weights), every training loss finite and the final validation losses
within train.soak.MARGIN. The full soak (every mixer, 2,000 steps) is
configs/sweeps/bf16_soak.yaml, its table notebooks/results/bf16_soak/."""

import numpy as np
import pytest

from arches.lm import LMConfig
from train import data, soak
from train.config import Config, DataConfig, OptimizerConfig, TrainConfig
from train.trainer.eval import evaluate_batches, put_batches
from train.trainer.sharding import shard_batch
from train.trainer.state import build
from train.trainer.step import make_eval_step, make_train_step

STEPS, BATCH, SEQ = 50, 4, 64
# rwkv6's default head_dim (64) does not divide d_model 32.
SPECS = {"gla": "gla", "rwkv6": {"name": "rwkv6", "head_dim": 16},
         "mamba2": "mamba2", "retnet": "retnet"}


def final_loss(mixer, dtype: str) -> float:
  cfg = Config(model=LMConfig(vocab_size=256, d_model=32, n_layers=2, mixer=mixer,
                              dtype=dtype),
               data=DataConfig(task="text", seq_len=SEQ, prefetch=0),
               optimizer=OptimizerConfig(warmup_steps=10),
               train=TrainConfig(steps=STEPS, batch_size=BATCH, run_dir="unused"))
  setup = build(cfg)
  state, step = setup.init_state(), make_train_step(setup)
  it = data.make_train_iter(cfg.data, BATCH, seed=0)
  losses = []
  for _ in range(STEPS):
    state, m = step(state, shard_batch(next(it), setup.mesh))
    losses.append(m["loss"])
  losses = np.asarray(losses, np.float64)
  assert np.isfinite(losses).all(), (
      f"{mixer} {dtype}: non-finite loss at step {np.argmin(np.isfinite(losses)) + 1}")
  batches = put_batches(data.make_eval_batches(cfg.data, BATCH, 4), setup)
  return evaluate_batches(make_eval_step(setup), state, batches, cfg.data)["val_loss"]


@pytest.mark.parametrize("mixer", list(SPECS))
def test_bf16_stays_within_margin_of_fp32(mixer):
  fp32, bf16 = (final_loss(SPECS[mixer], d) for d in ("float32", "bfloat16"))
  assert abs(bf16 - fp32) <= soak.MARGIN, (
      f"{mixer}: bf16 val loss {bf16:.4f} vs fp32 {fp32:.4f} (margin {soak.MARGIN})")


def test_verdict_flags_failures_and_drift():
  """The table's verdict can fail: a failed run, and a difference past the
  margin."""
  assert soak.verdict(2.0, 2.0 + soak.MARGIN / 2, []) == "ok"
  assert soak.verdict(2.0, 2.0 + 2 * soak.MARGIN, []).startswith("FAIL")
  assert soak.verdict(2.0, None, ["bfloat16: NonFiniteLossError"]).startswith("FAIL")
  assert soak.verdict(None, None, []) == "not run"
