"""Training and evaluation data: byte-level text and synthetic tasks, on grain.

    from train import data
    it = data.make_train_iter(cfg.data, batch_size=64, seed=0)
    batch = next(it)          # {"inputs", "targets", "loss_mask"[, "segment_ids"]}
    state = it.get_state()    # JSON-able; it.set_state(state) resumes exactly
    evals = data.make_eval_batches(cfg.data, 64, n_batches=8)
    data.vocab_size_for(cfg.data); data.describe(cfg.data)   # for the run record

Batches are dicts of numpy arrays [B, L]: `inputs` and `targets` int32,
`loss_mask` float32 (1 where loss and accuracy count), and `segment_ids`
int32 when packing (pieces numbered from 1 in each row, 0 = padding).

Text: tokens are bytes (vocab 256). `path` is a file, a folder (every file
below it, recursively, sorted, hidden entries skipped) or a glob; "" is the
embedded corpus, CPython's own standard library sources (`stdlib_files`).
Documents are the blank-line separated blocks of each file. The split is BY
DOCUMENT: a choice seeded by DataConfig.seed of round(val_fraction * D)
documents (at least one on each side) is validation; each side is its
documents concatenated in corpus order.
  - Unpacked, example i is the window stream[i*L : i*L + L + 1]; inputs are
    its first L bytes, targets its last L. Windows may span documents, as
    in nanoGPT.
  - Packed, each document yields the (input, target) pairs inside it, cut
    into pieces of at most L, laid next-fit in corpus order into rows of L.
    A document's last byte is never an input, so no target crosses a
    segment boundary.
Synthetic tasks (train/data/tasks.py) generate example i from (stream, seed, i).

The stream: the global batch of step k is positions k*B .. k*B+B-1 of an
infinite example sequence. For text, positions e*n .. e*n+n-1 are epoch e,
a permutation of the n examples seeded by (seed, e), so every epoch is
reshuffled. Process p of P takes rows p*B/P .. (p+1)*B/P-1 of each global
batch: hosts are disjoint, together they cover the global batch, and the
global stream does not depend on P. Batches are built vectorized per step
by a grain pipeline, MapDataset.range(steps).map(batch_of_step), so the
iterator state is just the next step and resuming is exact.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
from pathlib import Path

import grain
import jax
import numpy as np

from arches.validation import ConfigError, above, at_least, check_fields, one_of, within
from layers import mixers
from train.data.tasks import TASKS, Rng, permutation

TEXT_VOCAB = 256
TASK_NAMES = ("text", *TASKS)
# The embedded corpus: top-level stdlib modules matching the pattern, sorted
# by name. Debian/Ubuntu patch site.py and sysconfig.py; leaving them out
# keeps the bytes those of the upstream CPython release.
STDLIB_PATTERN = "[a-z]*.py"
STDLIB_EXCLUDE = ("site.py", "sysconfig.py")
_BLANK_RUN = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
# Key words that separate the random streams (see tasks.Rng).
_TRAIN, _VAL, _SHUFFLE, _SPLIT = range(4)


# -- corpus ---------------------------------------------------------------------

def stdlib_files() -> list[Path]:
  root = Path(sysconfig.get_paths()["stdlib"])
  return sorted((f for f in root.iterdir() if f.is_file()
                 and fnmatch.fnmatchcase(f.name, STDLIB_PATTERN)
                 and f.name not in STDLIB_EXCLUDE), key=lambda f: f.name)


def corpus_files(path: str) -> list[Path]:
  """The files of a corpus path, in corpus order."""
  if not path:
    files = stdlib_files()
    if not files:
      raise ConfigError(f"data.path='': the embedded corpus found no {STDLIB_PATTERN} "
                        f"files in {sysconfig.get_paths()['stdlib']}; set data.path",
                        "data.path")
    return files
  root = Path(path).expanduser()
  if root.is_file():
    return [root]
  if root.is_dir():
    files = sorted(f for f in root.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(root).parts))
    if not files:
      raise ConfigError(f"data.path={path!r} is a folder with no (non-hidden) files",
                        "data.path")
    return files
  if set("*?[") & set(path):
    files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True)
                   if Path(f).is_file())
    if not files:
      raise ConfigError(f"data.path={path!r}: the glob matches no files", "data.path")
    return files
  raise ConfigError(f"data.path={path!r} does not exist; give a text file, a folder, "
                    "a glob, or '' for the embedded corpus", "data.path")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  source: str
  files: int
  sha256: str
  tokens: np.ndarray       # uint8 [N]: the files concatenated
  doc_bounds: np.ndarray   # int64 [D+1]: document d is tokens[b[d]:b[d+1]]


def load_corpus(path: str) -> Corpus:
  """The corpus at `path`, cached while its files are unchanged."""
  files = corpus_files(path)
  stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
  source = path or (f"CPython {platform.python_version()} stdlib {STDLIB_PATTERN} "
                    f"minus {', '.join(STDLIB_EXCLUDE)}")
  return _read_corpus(stamp, source)


@functools.lru_cache(maxsize=4)
def _read_corpus(stamp, source: str) -> Corpus:
  sha = hashlib.sha256()
  chunks, starts, offset = [], [], 0
  for name, _, _ in stamp:
    content = Path(name).read_bytes()
    # Length-prefixed, so moving a file boundary changes the hash.
    sha.update(len(content).to_bytes(8, "little") + content)
    starts += [offset] + [offset + m.end() for m in _BLANK_RUN.finditer(content)
                          if m.end() < len(content)]
    chunks.append(content)
    offset += len(content)
  if offset == 0:
    raise ConfigError(f"data.path={source!r}: the corpus is empty "
                      f"({len(stamp)} files, 0 bytes)", "data.path")
  # Empty files would give empty documents; drop repeated starts.
  bounds = np.unique(np.asarray(starts + [offset], np.int64))
  return Corpus(source, len(stamp), sha.hexdigest(),
                np.frombuffer(b"".join(chunks), np.uint8), bounds)


def corpus_fingerprint(path: str = "") -> dict:
  """What a run records about its text corpus."""
  corpus = load_corpus(path)
  return {"sha256": corpus.sha256, "bytes": int(len(corpus.tokens)),
          "files": corpus.files, "source": corpus.source}


@dataclasses.dataclass(frozen=True, eq=False)
class TextSplit:
  tokens: np.ndarray       # uint8 [N]: the side's documents concatenated
  doc_bounds: np.ndarray   # int64 [D+1]


def text_splits(cfg) -> dict[str, TextSplit]:
  """{"train": ..., "val": ...}: the corpus split by document."""
  return _split_corpus(load_corpus(cfg.path), cfg.val_fraction, cfg.seed)


@functools.lru_cache(maxsize=4)
def _split_corpus(corpus: Corpus, val_fraction: float, seed: int) -> dict[str, TextSplit]:
  n_docs = len(corpus.doc_bounds) - 1
  if n_docs < 2:
    raise ConfigError(f"data.path={corpus.source!r} has {n_docs} document (blank-line "
                      "separated block); the train/validation split needs at least 2",
                      "data.path")
  n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
  is_val_D = np.zeros(n_docs, bool)
  is_val_D[permutation((_SPLIT, seed), n_docs)[:n_val]] = True
  lengths_D = np.diff(corpus.doc_bounds)
  is_val_N = np.repeat(is_val_D, lengths_D)
  return {name: TextSplit(corpus.tokens[is_val_N == val],
                          np.concatenate([[0], np.cumsum(lengths_D[is_val_D == val])]))
          for name, val in (("train", False), ("val", True))}


# -- example sources: batch(ids_B) -> batch dict --------------------------------

class WindowSource:
  """Unpacked text: example i is the window [i*L, i*L + L + 1)."""

  def __init__(self, split: TextSplit, seq_len: int):
    self.tokens, self.seq_len = split.tokens, seq_len
    self.size = (len(split.tokens) - 1) // seq_len

  def batch(self, ids_B: np.ndarray) -> dict[str, np.ndarray]:
    idx_BxL1 = ids_B[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    window_BxL1 = self.tokens[idx_BxL1].astype(np.int32)
    return {"inputs": window_BxL1[:, :-1], "targets": window_BxL1[:, 1:],
            "loss_mask": np.ones((len(ids_B), self.seq_len), np.float32)}


def pack_layout(doc_bounds: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Next-fit packing of documents into rows of seq_len input positions.

  Returns src [R, L] int64 (the stream index of each input, whose target is
  the next byte; -1 = padding) and segment ids [R, L] int32 (from 1 within
  a row; 0 = padding). A document of n bytes gives n-1 (input, target)
  pairs, cut into pieces of at most seq_len.
  """
  pairs_D = np.diff(doc_bounds) - 1
  keep = pairs_D > 0
  start_D, pairs_D = doc_bounds[:-1][keep], pairs_D[keep]
  pieces_D = -(-pairs_D // seq_len)
  first_piece_D = np.cumsum(pieces_D) - pieces_D
  piece_doc_P = np.repeat(np.arange(len(pieces_D)), pieces_D)
  piece_start_P = (start_D[piece_doc_P]
                   + seq_len * (np.arange(len(piece_doc_P)) - first_piece_D[piece_doc_P]))
  piece_len_P = np.minimum(seq_len, start_D[piece_doc_P] + pairs_D[piece_doc_P] - piece_start_P)

  row_P, col_P, seg_P = [], [], []
  row, col, seg = 0, 0, 0
  for n in piece_len_P.tolist():
    if col + n > seq_len:
      row, col, seg = row + 1, 0, 0
    seg += 1
    row_P.append(row), col_P.append(col), seg_P.append(seg)
    col += n
  n_rows = row + 1 if row_P else 0

  piece_T = np.repeat(np.arange(len(piece_len_P)), piece_len_P)
  within_T = np.arange(len(piece_T)) - (np.cumsum(piece_len_P) - piece_len_P)[piece_T]
  rows_T, cols_T = np.asarray(row_P)[piece_T], np.asarray(col_P)[piece_T] + within_T
  src_RxL = np.full((n_rows, seq_len), -1, np.int64)
  seg_RxL = np.zeros((n_rows, seq_len), np.int32)
  src_RxL[rows_T, cols_T] = piece_start_P[piece_T] + within_T
  seg_RxL[rows_T, cols_T] = np.asarray(seg_P, np.int32)[piece_T]
  return src_RxL, seg_RxL


class PackedSource:
  """Packed text: example i is row i of `pack_layout`."""

  def __init__(self, split: TextSplit, seq_len: int):
    self.tokens = split.tokens
    self.src_RxL, self.seg_RxL = pack_layout(split.doc_bounds, seq_len)
    self.size = len(self.src_RxL)

  def batch(self, ids_B: np.ndarray) -> dict[str, np.ndarray]:
    src_BxL = self.src_RxL[ids_B]
    valid_BxL = src_BxL >= 0
    safe_BxL = np.where(valid_BxL, src_BxL, 0)
    take = lambda idx: np.where(valid_BxL, self.tokens[idx], 0).astype(np.int32)
    return {"inputs": take(safe_BxL), "targets": take(safe_BxL + 1),
            "loss_mask": valid_BxL.astype(np.float32),
            "segment_ids": self.seg_RxL[ids_B]}


class SyntheticSource:
  """A synthetic task's examples: infinitely many, example i from (key, i)."""
  size = None

  def __init__(self, cfg, key: tuple[int, ...]):
    self.cfg, self.key, self.task = cfg, key, TASKS[cfg.task]

  def batch(self, ids_B: np.ndarray) -> dict[str, np.ndarray]:
    return self.task.generate(self.cfg, Rng(self.key, ids_B))


def _text_source(cfg, split: str):
  side = text_splits(cfg)[split]
  source = (PackedSource if cfg.pack else WindowSource)(side, cfg.seq_len)
  if source.size < 1:
    need = ("a document of at least 2 bytes" if cfg.pack
            else f"seq_len+1 = {cfg.seq_len + 1} bytes")
    raise ConfigError(f"data: the {split} split of {load_corpus(cfg.path).source!r} has "
                      f"{len(side.tokens)} bytes in {len(side.doc_bounds) - 1} documents, "
                      f"not one example (needs {need}); use a larger corpus, another "
                      "val_fraction or a shorter seq_len", "data.path", "data.seq_len",
                      "data.val_fraction")
  return source


def _source(cfg, split: str, seed: int):
  if cfg.task == "text":
    return _text_source(cfg, split)
  return SyntheticSource(cfg, (_TRAIN, seed) if split == "train" else (_VAL, cfg.seed))


# -- configuration ----------------------------------------------------------------

def check_config(cfg) -> None:
  """Raise a ConfigError naming the bad DataConfig field and what is allowed
  (`DataConfig` runs this when it is built). Whether data.path exists is
  checked by `train.configs.load` and when the corpus is read."""
  check_fields(cfg, "data", task=one_of(TASK_NAMES), seq_len=at_least(1),
               val_fraction=within(0, 1, open_lo=True, open_hi=True), seed=at_least(0),
               prefetch=at_least(0), num_kv_pairs=at_least(1), mqar_power_a=above(0),
               copy_tokens=at_least(1), vocab_size=at_least(2))
  if cfg.task == "text":
    if cfg.vocab_size != TEXT_VOCAB:
      raise ConfigError(f"data.vocab_size={cfg.vocab_size}: the text task is "
                        f"byte-level, vocab_size must be {TEXT_VOCAB}", "data.vocab_size")
    return
  if cfg.pack:
    raise ConfigError(f"data.pack=True is for the text task, not {cfg.task!r}",
                      "data.pack", "data.task")
  if cfg.path:
    raise ConfigError(f"data.path={cfg.path!r} is for the text task, not {cfg.task!r}",
                      "data.path", "data.task")
  TASKS[cfg.task].check(cfg)


def vocab_size_for(cfg) -> int:
  return TEXT_VOCAB if cfg.task == "text" else cfg.vocab_size


def check_packing_supported(model_cfg) -> None:
  """Raise unless every mixer of the model takes segment_ids."""
  unsupported = sorted({name for name, _ in model_cfg.mixer_specs()
                        if not mixers.info(name).supports_segments})
  if unsupported:
    raise ConfigError(f"data.pack=True needs mixers that support segment_ids; "
                      f"{unsupported} do not (info.supports_segments is False). "
                      "Set data.pack=False or use other mixers.", "data.pack", "model.mixer")


def check_compatible(data_cfg, model_cfg) -> None:
  """The model's vocabulary holds the data's, and packing is supported."""
  vocab = vocab_size_for(data_cfg)
  if model_cfg.vocab_size < vocab:
    raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                      f"{data_cfg.task!r} data's vocabulary {vocab}", "model.vocab_size",
                      "data.task" if data_cfg.task == "text" else "data.vocab_size")
  if data_cfg.pack:
    check_packing_supported(model_cfg)


def batch_dtypes(cfg) -> dict[str, np.dtype]:
  """The arrays of a batch (each [B, L]) and their dtypes, as the streams
  below produce them: for compiling a step without reading any data."""
  out = {"inputs": np.dtype(np.int32), "targets": np.dtype(np.int32),
         "loss_mask": np.dtype(np.float32)}
  if cfg.pack:
    out["segment_ids"] = np.dtype(np.int32)
  return out


def describe(cfg) -> dict:
  """A JSON-able record of the data a run uses."""
  record = {"task": cfg.task, "vocab_size": vocab_size_for(cfg), "seq_len": cfg.seq_len}
  if cfg.task != "text":
    sample = SyntheticSource(cfg, (_VAL, cfg.seed)).batch(np.arange(4))
    # Changes when the generator changes, so results stay comparable.
    record.update(paper=TASKS[cfg.task].paper, sample_sha256=hashlib.sha256(
        b"".join(sample[k].tobytes() for k in sorted(sample))).hexdigest())
    return record
  sides = text_splits(cfg)
  record.update(corpus=corpus_fingerprint(cfg.path), split="by document", pack=cfg.pack,
                **{f"{name}_{what}": value for name, side in sides.items()
                   for what, value in (("bytes", int(len(side.tokens))),
                                       ("documents", len(side.doc_bounds) - 1))})
  return record


# -- streams ------------------------------------------------------------------------

def _local_rows(batch_size: int, process_index, process_count) -> np.ndarray:
  """This process's rows of a global batch."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if not 0 <= p < n:
    raise ValueError(f"process_index={p} must be in [0, process_count={n})")
  if batch_size < 1 or batch_size % n:
    raise ConfigError(f"batch_size={batch_size} (global) must be a positive multiple "
                      f"of process_count={n}", "train.batch_size")
  rows = batch_size // n
  return np.arange(p * rows, (p + 1) * rows)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  return permutation((_SHUFFLE, seed, epoch), n)


def _train_ids(source, seed: int, positions_B: np.ndarray) -> np.ndarray:
  """Example ids at stream positions: epochs of seeded permutations."""
  if source.size is None:
    return positions_B
  epoch_B, within_B = np.divmod(positions_B, source.size)
  ids_B = np.empty_like(positions_B)
  for epoch in np.unique(epoch_B).tolist():
    at = epoch_B == epoch
    ids_B[at] = _epoch_order(seed, epoch, source.size)[within_B[at]]
  return ids_B


class DataIterator:
  """An infinite iterator of batches over a grain pipeline.

  get_state() is a JSON-able dict, the same on every process (the next
  global step and what identifies the stream); set_state(state) resumes
  exactly, and refuses a state from a different stream.
  """

  def __init__(self, dataset: grain.MapDataset, identity: dict, prefetch: int):
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    self._it = iter(dataset.to_iter_dataset(read))
    self._identity = json.loads(json.dumps(identity))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return {"stream": self._identity, "grain": self._it.get_state()}

  def set_state(self, state: dict) -> None:
    stream = state.get("stream", {})
    if stream != self._identity:
      keys = sorted(k for k in self._identity.keys() | stream.keys()
                    if stream.get(k) != self._identity.get(k))
      raise ValueError(f"data iterator state is from a different stream (differs in "
                       f"{keys}: saved {[stream.get(k) for k in keys]}, now "
                       f"{[self._identity.get(k) for k in keys]})")
    self._it.set_state(state["grain"])


def make_train_iter(data_cfg, batch_size: int, *, seed: int, process_index=None,
                    process_count=None) -> DataIterator:
  """The infinite training stream; `batch_size` is the global batch, of which
  this process gets batch_size // process_count rows (defaults: jax's)."""
  source = _source(data_cfg, "train", seed)
  rows_b = _local_rows(batch_size, process_index, process_count)

  def batch_of_step(step: int) -> dict[str, np.ndarray]:
    return source.batch(_train_ids(source, seed, step * batch_size + rows_b))

  # Flat, so a mismatch names the field. Prefetching does not change the stream.
  identity = {f"data.{k}": v for k, v in dataclasses.asdict(data_cfg).items()
              if k != "prefetch"}
  identity.update(batch_size=batch_size, seed=seed)
  if data_cfg.task == "text":
    identity["corpus_sha256"] = load_corpus(data_cfg.path).sha256
  dataset = grain.MapDataset.range(sys.maxsize).map(batch_of_step)
  return DataIterator(dataset, identity, data_cfg.prefetch)


def make_eval_batches(data_cfg, batch_size: int, n_batches: int, *, process_index=None,
                      process_count=None) -> list[dict[str, np.ndarray]]:
  """Deterministic validation batches (the same for any training seed): for
  text, batch_size * n_batches examples evenly spaced over the validation
  split; for synthetic tasks, the validation stream seeded by data.seed."""
  source = _source(data_cfg, "val", data_cfg.seed)
  rows_b = _local_rows(batch_size, process_index, process_count)
  total = batch_size * n_batches
  if source.size is None:
    ids = np.arange(total)
  elif total > source.size:
    raise ConfigError(f"data: {n_batches} eval batches of {batch_size} need {total} "
                      f"examples; the validation split has {source.size} (lower "
                      "train.eval_batches or raise data.val_fraction)",
                      "train.eval_batches", "data.val_fraction")
  else:
    ids = np.arange(total) * source.size // total
  return [source.batch(ids[k * batch_size + rows_b]) for k in range(n_batches)]
