"""train/data/ (the pipeline and tasks.py): text and synthetic batches,
packing, per-host sharding, exact resume, and the errors for bad input."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from arches.lm import LMConfig
from train import data
from train.data import tasks
from train.config import DataConfig

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / ".." / "shared" / "data" / "tinyshakespeare.txt"


def _doc(i: int) -> bytes:
  """Document i: a unique tag, then letters, never a blank line inside."""
  rng = np.random.default_rng(i)
  words = [bytes(rng.integers(97, 123, rng.integers(2, 9)).astype(np.uint8))
           for _ in range(rng.integers(3, 40))]
  return b"<doc%03d> " % i + b" ".join(words) + b"\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """60 documents in 3 files (one in a subfolder), plus a hidden file."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "sub").mkdir()
  for k, name in enumerate(["a.txt", "b.txt", "sub/c.txt"]):
    (root / name).write_bytes(b"\n".join(_doc(20 * k + i) for i in range(20)))
  (root / ".hidden").write_bytes(b"<doc999> skipped\n")
  return root


def _docs(tokens: np.ndarray) -> list[bytes]:
  return [d.rstrip(b"\n") for d in re.split(rb"(?=<doc)", bytes(tokens)) if d]


def _text(root=None, **kw):
  return DataConfig(path=str(root) if root else "", seq_len=16, val_fraction=0.2, prefetch=0, **kw)


def _same(a, b) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- text -------------------------------------------------------------------------

def test_text_batches_shapes_determinism(corpus_dir):
  cfg = _text(corpus_dir)
  first = [next(data.make_train_iter(cfg, 4, seed=s)) for s in (0, 0, 1)]
  batch = first[0]
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((4, 16), np.int32), "targets": ((4, 16), np.int32),
      "loss_mask": ((4, 16), np.float32)}
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  assert (batch["loss_mask"] == 1).all()
  assert _same(first[0], first[1]) and not _same(first[0], first[2])
  assert data.vocab_size_for(cfg) == 256


def test_split_by_document_disjoint_covering_seeded(corpus_dir):
  cfg = _text(corpus_dir)
  sides = data.text_splits(cfg)
  train, val = (set(_docs(sides[k].tokens)) for k in ("train", "val"))
  assert train | val == {_doc(i).rstrip(b"\n") for i in range(60)}
  assert not train & val and len(val) == 12          # round(0.2 * 60)
  assert b"<doc999>" not in bytes(sides["train"].tokens)  # hidden file skipped
  other = data.text_splits(dataclasses.replace(cfg, seed=1))
  assert set(_docs(other["val"].tokens)) != val
  # Every eval window lies inside the validation stream.
  val_bytes = bytes(sides["val"].tokens)
  for b in data.make_eval_batches(cfg, 4, 2):
    for row_in, row_tgt in zip(b["inputs"], b["targets"]):
      assert bytes(row_in.astype(np.uint8)) + bytes(row_tgt[-1:].astype(np.uint8)) in val_bytes


def test_eval_batches_deterministic_and_spread(corpus_dir):
  cfg = _text(corpus_dir)
  a, b = data.make_eval_batches(cfg, 4, 3), data.make_eval_batches(cfg, 4, 3)
  assert len(a) == 3 and all(_same(x, y) for x, y in zip(a, b))
  rows = np.concatenate([x["inputs"] for x in a])
  assert len({r.tobytes() for r in rows}) == len(rows)


def test_epochs_cover_every_window_then_reshuffle(corpus_dir):
  source = data._text_source(_text(corpus_dir), "train")
  n = source.size
  epoch0 = data._train_ids(source, 5, np.arange(n))
  epoch1 = data._train_ids(source, 5, np.arange(n, 2 * n))
  assert sorted(epoch0) == sorted(epoch1) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)


def test_embedded_corpus_fingerprint_stable():
  a, b = data.corpus_fingerprint(), data.corpus_fingerprint("")
  files = data.stdlib_files()
  assert a == b and a["files"] == len(files) > 50
  assert a["bytes"] == sum(f.stat().st_size for f in files) > 1_000_000
  assert len(a["sha256"]) == 64 and "stdlib" in a["source"]
  record = data.describe(DataConfig())
  assert record["corpus"] == a and record["val_documents"] > 0
  json.dumps(record)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} absent")
def test_tinyshakespeare_file():
  cfg = DataConfig(path=str(SHAKESPEARE), seq_len=64, prefetch=0)
  fp = data.corpus_fingerprint(cfg.path)
  assert fp["files"] == 1 and fp["bytes"] == SHAKESPEARE.stat().st_size
  batch = next(data.make_train_iter(cfg, 2, seed=0))
  assert batch["inputs"].max() < 128                 # ASCII text


# -- packing ------------------------------------------------------------------------

def test_packing_segments_never_cross_documents(corpus_dir):
  cfg = _text(corpus_dir, pack=True)
  source = data._text_source(cfg, "train")
  batch = source.batch(np.arange(source.size))
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  assert seg.dtype == np.int32 and seg.shape == batch["inputs"].shape
  np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
  assert (np.diff(seg, axis=1)[seg[:, 1:] > 0] >= 0).all()   # 1, 1, 2, 2, ..., 0 pad
  assert (np.diff(seg, axis=1)[seg[:, :-1] > 0] <= 1).all()
  docs = bytes(data.text_splits(cfg)["train"].tokens)
  pairs = 0
  for r in range(len(seg)):
    for s in range(1, seg[r].max() + 1):
      at = seg[r] == s
      inp, tgt = batch["inputs"][r][at], batch["targets"][r][at]
      np.testing.assert_array_equal(tgt[:-1], inp[1:])
      piece = bytes(inp.astype(np.uint8)) + bytes(tgt[-1:].astype(np.uint8))
      # One document's bytes, and no document boundary inside.
      assert piece in docs and b"\n<doc" not in piece
      pairs += at.sum()
  n_docs = len(data.text_splits(cfg)["train"].doc_bounds) - 1
  assert pairs == len(docs) - n_docs                 # every pair exactly once


def test_pack_layout_next_fit():
  bounds = np.array([0, 5, 6, 9, 30])   # docs of 5, 1, 3, 21 bytes
  src, seg = data.pack_layout(bounds, 8)
  # pairs: 4, 0 (dropped), 2, 20 -> pieces 4 | 2 | 8 | 8 | 4, next-fit in rows of 8
  np.testing.assert_array_equal(seg, [[1, 1, 1, 1, 2, 2, 0, 0], [1] * 8, [1] * 8,
                                      [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(src[0], [0, 1, 2, 3, 6, 7, -1, -1])
  np.testing.assert_array_equal(src[3][:4], [25, 26, 27, 28])


def test_packing_refused_for_mixers_without_segments(monkeypatch):
  model = LMConfig(n_layers=2)
  data.check_packing_supported(model)
  data.check_compatible(DataConfig(pack=True), model)
  real = data.mixers.info
  monkeypatch.setattr(data.mixers, "info", lambda name: dataclasses.replace(
      real(name), supports_segments=False))
  with pytest.raises(ValueError, match=r"\['attention'\] do not"):
    data.check_compatible(DataConfig(pack=True), model)
  data.check_compatible(DataConfig(pack=False), model)
  with pytest.raises(ValueError, match="model.vocab_size=16"):
    data.check_compatible(DataConfig(), LMConfig(vocab_size=16))


# -- synthetic tasks ------------------------------------------------------------------

def _synthetic(task, **kw):
  return DataConfig(task=task, seq_len=64, vocab_size=40, num_kv_pairs=6,
                    copy_tokens=5, prefetch=0, **kw)


@pytest.mark.parametrize("random_fill", [False, True], ids=["zero_fill", "random_fill"])
def test_mqar_matches_zoologys_definition(random_fill):
  """Zoology's multiquery_ar: keys from the lower half of the vocabulary and
  values from the upper, the pairs first, each key queried once at an even
  offset after them with its value as the target, and every other position
  0 (random_non_queries=False) or uniform over the vocabulary (True)."""
  cfg = _synthetic("mqar", mqar_random_non_queries=random_fill)
  b = data.make_eval_batches(cfg, 256, 1)[0]
  n, V, half = 6, 40, 20
  fill = []
  for inp, tgt, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
    keys, values = inp[0:2 * n:2], inp[1:2 * n:2]
    assert ((keys >= 1) & (keys < half)).all() and len(set(keys)) == n
    assert ((values >= half) & (values < V)).all() and len(set(values)) == n
    where = np.flatnonzero(mask)
    assert len(where) == n and (where >= 2 * n).all() and ((where - 2 * n) % 2 == 0).all()
    lookup = dict(zip(keys, values))
    assert sorted(inp[where]) == sorted(keys)
    assert all(tgt[j] == lookup[inp[j]] for j in where)
    assert (tgt[mask == 0] == 0).all()
    rest = np.ones(len(inp), bool)
    rest[:2 * n], rest[where] = False, False
    fill.append(inp[rest])
  fill = np.concatenate(fill)
  if not random_fill:
    assert (fill == 0).all()
    return
  # ~11K tokens over 40 ids: each id's count is within 6 sigma of uniform
  counts = np.bincount(fill, minlength=V)
  expected = len(fill) / V
  assert len(counts) == V and (np.abs(counts - expected) < 6 * np.sqrt(expected)).all()


def test_mqar_gaps_follow_the_power_law():
  """The first key's query gap has the marginal p(g) ~ (g+1)^(a-1)."""
  cfg = _synthetic("mqar", mqar_power_a=0.01)
  b = tasks.generate_mqar(cfg, tasks.Rng((7,), np.arange(4000)))
  n, space = 6, (64 - 12) // 2
  first_key = b["inputs"][:, 0]
  query = np.argmax((b["inputs"][:, 2 * n:] == first_key[:, None])
                    & (b["loss_mask"][:, 2 * n:] > 0), axis=1)
  p = np.arange(1, space + 1) ** (0.01 - 1)
  p /= p.sum()
  observed = np.bincount(query // 2, minlength=space) / len(query)
  np.testing.assert_allclose(observed[:3], p[:3], atol=0.025)


def test_selective_copy_structure():
  cfg = _synthetic("selective_copy")
  b = data.make_eval_batches(cfg, 16, 1)[0]
  M, L, V = 5, 64, 40
  for inp, tgt, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
    context = inp[:L - M]
    tokens = context[context != 0]
    assert len(tokens) == M and ((tokens >= 1) & (tokens <= V - 2)).all()
    assert (inp[L - M:] == V - 1).all()
    np.testing.assert_array_equal(tgt[L - M:], tokens)
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(L - M, L))


def test_induction_structure():
  cfg = _synthetic("induction")
  b = data.make_eval_batches(cfg, 16, 1)[0]
  L, V = 64, 40
  for inp, tgt, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
    triggers = np.flatnonzero(inp == V - 1)
    assert len(triggers) == 2 and triggers[1] == L - 1 and triggers[0] <= L - 3
    assert tgt[L - 1] == inp[triggers[0] + 1] != V - 1
    np.testing.assert_array_equal(np.flatnonzero(mask), [L - 1])


def test_synthetic_deterministic_per_index_and_seed():
  cfg = _synthetic("mqar")
  a = next(data.make_train_iter(cfg, 8, seed=3))
  b = next(data.make_train_iter(cfg, 8, seed=4))
  one = tasks.generate_mqar(cfg, tasks.Rng((0, 3), np.array([5])))   # (_TRAIN, seed)
  assert not _same(a, b)
  np.testing.assert_array_equal(one["inputs"][0], a["inputs"][5])
  val = data.make_eval_batches(cfg, 8, 1)[0]
  assert not np.array_equal(val["inputs"], a["inputs"])


# -- sharding and resume ---------------------------------------------------------------

@pytest.mark.parametrize("cfg", [_text(), _text(pack=True), _synthetic("mqar")],
                         ids=["text", "packed", "mqar"])
def test_hosts_split_the_global_batch(cfg, corpus_dir):
  if cfg.task == "text":
    cfg = dataclasses.replace(cfg, path=str(corpus_dir))
  whole = data.make_train_iter(cfg, 8, seed=0, process_index=0, process_count=1)
  hosts = [data.make_train_iter(cfg, 8, seed=0, process_index=p, process_count=4)
           for p in range(4)]
  for _ in range(3):
    glob = next(whole)
    parts = [next(h) for h in hosts]
    for k in glob:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob[k])
  evals = [data.make_eval_batches(cfg, 8, 2, process_index=p, process_count=2)
           for p in range(2)]
  for k, full in enumerate(data.make_eval_batches(cfg, 8, 2, process_count=1, process_index=0)):
    np.testing.assert_array_equal(
        np.concatenate([evals[0][k]["inputs"], evals[1][k]["inputs"]]), full["inputs"])


@pytest.mark.parametrize("cfg", [_text(), _text(pack=True),
                                 _synthetic("induction")], ids=["text", "packed", "induction"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_is_exact(cfg, prefetch, corpus_dir):
  if cfg.task == "text":
    cfg = dataclasses.replace(cfg, path=str(corpus_dir))
  cfg = dataclasses.replace(cfg, prefetch=prefetch)
  # Text epochs here are a handful of steps, so this also crosses epochs.
  it = data.make_train_iter(cfg, 64, seed=1)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  resumed = data.make_train_iter(cfg, 64, seed=1)
  resumed.set_state(state)
  assert all(_same(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))
  other = data.make_train_iter(cfg, 64, seed=2)
  with pytest.raises(ValueError, match=r"different stream.*\['seed'\]"):
    other.set_state(state)
  longer = data.make_train_iter(dataclasses.replace(cfg, seq_len=cfg.seq_len + 1), 64, seed=1)
  with pytest.raises(ValueError, match=r"\['data.seq_len'\]"):
    longer.set_state(state)


# -- bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda root: DataConfig(path=str(root / "missing.txt")), "missing.txt.*does not exist"),
    (lambda root: DataConfig(path=str(root / "*.nothing")), "glob matches no files"),
    (lambda root: DataConfig(path=str(root / "empty_dir")), "folder with no"),
    (lambda root: DataConfig(path=str(root / "empty.txt")), "corpus is empty"),
    (lambda root: DataConfig(path=str(root / "one_doc.txt")), "1 document"),
    (lambda root: DataConfig(path=str(root / "one_doc*"), seq_len=0), "seq_len=0"),
    (lambda root: DataConfig(path=str(root / "two_docs.txt"), seq_len=64),
     "the train split of .* seq_len\\+1 = 65"),
    (lambda root: DataConfig(val_fraction=1.0), "val_fraction=1.0"),
    (lambda root: DataConfig(vocab_size=512), "byte-level"),
    (lambda root: DataConfig(task="copy"), "data.task='copy' must be one of text, mqar"),
    (lambda root: DataConfig(task="mqar", pack=True), "pack=True is for the text task"),
    (lambda root: DataConfig(task="mqar", seq_len=30, num_kv_pairs=8),
     r"seq_len=30 must be >= 4 \* num_kv_pairs = 32"),
    (lambda root: DataConfig(task="mqar", vocab_size=16, num_kv_pairs=8),
     "vocab_size=16 must be >= 2 \\* num_kv_pairs \\+ 2 = 18"),
    (lambda root: DataConfig(task="selective_copy", seq_len=20, copy_tokens=16),
     "seq_len=20 must be >= 2 \\* copy_tokens = 32"),
    (lambda root: DataConfig(task="induction", seq_len=2), "seq_len=2 must be >= 3"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_config_errors(make, match, tmp_path):
  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "one_doc.txt").write_bytes(b"no blank line here\n")
  (tmp_path / "two_docs.txt").write_bytes(b"first\n\nsecond\n")
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    data.make_train_iter(make(tmp_path), 2, seed=0)


def test_bad_batch_and_eval_sizes(corpus_dir):
  cfg = _text(corpus_dir)
  with pytest.raises(ValueError, match="batch_size=6 .* multiple of process_count=4"):
    data.make_train_iter(cfg, 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=4 must be in"):
    data.make_train_iter(cfg, 8, seed=0, process_index=4, process_count=4)
  with pytest.raises(ValueError, match="1000 eval batches of 8 need 8000 examples"):
    data.make_eval_batches(cfg, 8, 1000)
