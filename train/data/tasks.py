"""Synthetic sequence tasks from the efficient-architecture literature.

    rng = Rng(key=(stream, seed), index_B=np.arange(8))
    batch = TASKS["mqar"].generate(data_cfg, rng)   # inputs/targets/loss_mask [8, L]

Example i of a stream is a pure function of (key, i): the random numbers
come from a counter-based hash (splitmix64) of the key, the example index
and a draw number, vectorized over a batch of indices. So a batch costs a
few numpy calls, any example can be regenerated alone (resume, sharding),
and the streams are the same on every machine and numpy version.

Each task puts loss and accuracy only on its answer positions
(`loss_mask`); `targets` elsewhere are 0 and carry no signal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from arches.validation import ConfigError

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
  """splitmix64's finalizer: a bijective avalanche on uint64 (wraps mod 2^64)."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _smallest(score_BxN: np.ndarray, k: int) -> np.ndarray:
  """[B, k] column indices of the k smallest scores per row, ascending by
  score: a partial selection, O(N + k log k) per row."""
  part_BxK = np.argpartition(score_BxN, k - 1, axis=1)[:, :k]
  order_BxK = np.argsort(np.take_along_axis(score_BxN, part_BxK, axis=1), axis=1)
  return np.take_along_axis(part_BxK, order_BxK, axis=1)


def _fold(state, word):
  with np.errstate(over="ignore"):
    return _mix(state ^ _mix(np.asarray(word, np.uint64) + _GOLDEN))


class Rng:
  """Counter-based random draws for a batch of example indices.

  key: ints naming the stream (split, seed, ...); index_B: int example
  indices. Draw number `draw` gives independent numbers within an example.
  """

  def __init__(self, key: Sequence[int], index_B: np.ndarray):
    state = np.uint64(0)
    for word in key:
      state = _fold(state, word & _MASK64)
    self.index_B = np.asarray(index_B, np.int64)
    self._row_B = _fold(state, self.index_B.astype(np.uint64))

  @property
  def size(self) -> int:
    return len(self.index_B)

  def uniform(self, draw: int, n: int) -> np.ndarray:
    """[B, n] float64 in the open interval (0, 1)."""
    row_B = _fold(self._row_B, draw)
    with np.errstate(over="ignore"):
      h_BxN = _mix(row_B[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN))
    return ((h_BxN >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

  def integers(self, draw: int, n: int, low: int, high: int) -> np.ndarray:
    """[B, n] int64 uniform in [low, high)."""
    return low + np.floor(self.uniform(draw, n) * (high - low)).astype(np.int64)

  def subset(self, draw: int, n: int, k: int) -> np.ndarray:
    """[B, k] distinct values of range(n) in uniformly random order."""
    return _smallest(self.uniform(draw, n), k)

  def sorted_subset(self, draw: int, n: int, k: int) -> np.ndarray:
    """[B, k] distinct values of range(n), ascending (O(n) selection)."""
    part_BxK = np.argpartition(self.uniform(draw, n), k - 1, axis=1)[:, :k]
    return np.sort(part_BxK, axis=1)

  def weighted_subset(self, draw: int, logp_N: np.ndarray, k: int) -> np.ndarray:
    """[B, k] distinct indices drawn without replacement with probabilities
    exp(logp_N) (unnormalized), in draw order: the Gumbel-top-k trick, the
    same distribution as np.random.choice(..., replace=False, p=p)."""
    gumbel_BxN = -np.log(-np.log(self.uniform(draw, len(logp_N))))
    return _smallest(-(logp_N + gumbel_BxN), k)


def permutation(key: Sequence[int], n: int) -> np.ndarray:
  """A permutation of range(n) determined by `key`."""
  return Rng(key, np.zeros(1, np.int64)).subset(0, n, n)[0]


def _require(ok: bool, message: str, *keys: str) -> None:
  """A task's rule across DataConfig fields (each field's own range is
  checked by `train.data.check_config` first)."""
  if not ok:
    raise ConfigError(message, *keys)


def _empty(batch: int, length: int) -> dict[str, np.ndarray]:
  return {"inputs": np.zeros((batch, length), np.int32),
          "targets": np.zeros((batch, length), np.int32),
          "loss_mask": np.zeros((batch, length), np.float32)}


# -- MQAR ---------------------------------------------------------------------

def check_mqar(cfg) -> None:
  n, L, V = cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
  _require(L >= 4 * n, f"mqar: data.seq_len={L} must be >= 4 * num_kv_pairs = {4 * n} "
           "(the key-value pairs take 2*num_kv_pairs tokens and each query "
           "needs its own slot in the 2*num_kv_pairs after them)",
           "data.seq_len", "data.num_kv_pairs")
  _require(V >= 2 * n + 2, f"mqar: data.vocab_size={V} must be >= 2 * num_kv_pairs + 2 "
           f"= {2 * n + 2} (distinct keys from 1..vocab_size//2-1, distinct "
           "values from the upper half)", "data.vocab_size", "data.num_kv_pairs")


def generate_mqar(cfg, rng: Rng) -> dict[str, np.ndarray]:
  """Multi-query associative recall as Zoology's `multiquery_ar`
  (HazyResearch/zoology, zoology/data/associative_recall.py, `_mqar`).

  Keys come from 1..V//2-1 and values from V//2..V-1, distinct within an
  example; the 2n-token prefix is k1 v1 k2 v2 ...; then each key is queried
  once at position 2n + 2*gap, the gaps drawn without replacement from
  p(gap) ~ (gap+1)^(a-1), gap in 0..(L-2n)//2-1 (a = mqar_power_a, Zoology's
  power_a = 0.01; a = 1 is uniform). The target at a query position is its
  value (the value itself never follows the query). Every other position
  holds 0 (Zoology's random_non_queries=False, as in its Figure 2 configs),
  or with mqar_random_non_queries a token uniform over 0..V-1, keys and
  values included (random_non_queries=True, Zoology's function default).

  Where we differ from Zoology: each example is a pure function of its
  index (an endless stream, not a fixed 100K-example training set read for
  many epochs; validation is a fixed stream of data.seed, not a 3K test
  set); the gaps are drawn by Gumbel-top-k, the same distribution as its
  np.random.choice(replace=False, p=p); answers are marked by loss_mask, not
  by -100 labels; and we require L >= 4n and V >= 2n+2 where it asserts an
  even L, L >= 4n and V > L.
  """
  B, L, n, V = rng.size, cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
  half = V // 2
  keys_BxN = 1 + rng.subset(0, half - 1, n)
  values_BxN = half + rng.subset(1, V - half, n)
  space = (L - 2 * n) // 2
  logp_S = (cfg.mqar_power_a - 1.0) * np.log(np.arange(1, space + 1))
  query_pos_BxN = 2 * n + 2 * rng.weighted_subset(2, logp_S, n)

  out = _empty(B, L)
  inputs_BxL = out["inputs"]
  if cfg.mqar_random_non_queries:
    inputs_BxL[:] = rng.integers(3, L, 0, V)
  inputs_BxL[:, 0:2 * n:2] = keys_BxN
  inputs_BxL[:, 1:2 * n:2] = values_BxN
  np.put_along_axis(inputs_BxL, query_pos_BxN, keys_BxN, axis=1)
  np.put_along_axis(out["targets"], query_pos_BxN, values_BxN, axis=1)
  np.put_along_axis(out["loss_mask"], query_pos_BxN, 1.0, axis=1)
  return out


# -- selective copying ---------------------------------------------------------

def check_selective_copy(cfg) -> None:
  M, L, V = cfg.copy_tokens, cfg.seq_len, cfg.vocab_size
  _require(L >= 2 * M, f"selective_copy: data.seq_len={L} must be >= 2 * copy_tokens = "
           f"{2 * M} (copy_tokens scattered in the context, then copy_tokens markers)",
           "data.seq_len", "data.copy_tokens")
  _require(V >= 3, f"selective_copy: data.vocab_size={V} must be >= 3 "
           "(blank 0, data tokens 1..vocab_size-2, marker vocab_size-1)", "data.vocab_size")


def generate_selective_copy(cfg, rng: Rng) -> dict[str, np.ndarray]:
  """Selective copying (Gu & Dao 2023, Mamba, arXiv:2312.00752, after the S4
  repository's copying data with variable=True).

  The first L-M positions hold M data tokens (1..V-2) at random sorted
  positions among blanks (0); the last M positions are markers (V-1), and
  the target at the j-th marker is the j-th data token.
  """
  B, L, M, V = rng.size, cfg.seq_len, cfg.copy_tokens, cfg.vocab_size
  context = L - M
  tokens_BxM = rng.integers(0, M, 1, V - 1)
  positions_BxM = rng.sorted_subset(1, context, M)
  out = _empty(B, L)
  np.put_along_axis(out["inputs"], positions_BxM, tokens_BxM, axis=1)
  out["inputs"][:, context:] = V - 1
  out["targets"][:, context:] = tokens_BxM
  out["loss_mask"][:, context:] = 1.0
  return out


# -- induction heads -----------------------------------------------------------

def check_induction(cfg) -> None:
  L, V = cfg.seq_len, cfg.vocab_size
  _require(L >= 3, f"induction: data.seq_len={L} must be >= 3 (trigger, target, trigger)",
           "data.seq_len")
  _require(V >= 3, f"induction: data.vocab_size={V} must be >= 3 "
           "(tokens 0..vocab_size-2, trigger vocab_size-1)", "data.vocab_size")


def generate_induction(cfg, rng: Rng) -> dict[str, np.ndarray]:
  """Induction heads (Olsson et al. 2022; the Mamba paper's synthetic).

  Random tokens from 0..V-2; the trigger V-1 sits once at a random position
  p <= L-3 and again at the last position, whose target is the token at
  p+1.
  """
  B, L, V = rng.size, cfg.seq_len, cfg.vocab_size
  out = _empty(B, L)
  inputs_BxL = rng.integers(0, L, 0, V - 1)
  trigger_B = rng.integers(1, 1, 0, L - 2)[:, 0]
  rows_B = np.arange(B)
  inputs_BxL[rows_B, trigger_B] = V - 1
  inputs_BxL[:, L - 1] = V - 1
  out["inputs"][:] = inputs_BxL
  out["targets"][:, L - 1] = inputs_BxL[rows_B, trigger_B + 1]
  out["loss_mask"][:, L - 1] = 1.0
  return out


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  paper: str
  check: Callable[..., None]
  generate: Callable[..., dict[str, np.ndarray]]


TASKS = {t.name: t for t in (
    Task("mqar", "Zoology (Arora et al. 2023, arXiv:2312.04927), multiquery_ar",
         check_mqar, generate_mqar),
    Task("selective_copy", "Mamba (Gu & Dao 2023, arXiv:2312.00752), selective copying",
         check_selective_copy, generate_selective_copy),
    Task("induction", "Mamba (Gu & Dao 2023, arXiv:2312.00752), induction heads",
         check_induction, generate_induction),
)}
