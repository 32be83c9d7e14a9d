"""Config files: includes, overrides, error messages, saved resolved config."""

import os

import pytest

from arches.lm import LMConfig
from arches.validation import ConfigError
from layers import mixers
from train import configs
from train.config import Config, MeshConfig, TrainConfig

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def write(tmp_path, name, text):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return str(path)


def test_includes_merge_in_order_and_each_file_once(tmp_path):
  write(tmp_path, "base.yaml", "model: {d_model: 96, n_layers: 3}\ntrain: {steps: 7}\n")
  task = write(tmp_path, "tasks/t.yaml", "include: ../base.yaml\ndata: {task: mqar}\n")
  mixer = write(tmp_path, "m.yaml", "include: base.yaml\nmodel: {n_layers: 5}\n")
  # base.yaml is included by both; it must not reset the task file's keys.
  cfg = configs.load([task, mixer])
  assert isinstance(cfg, Config)
  assert (cfg.model.d_model, cfg.model.n_layers, cfg.data.task, cfg.train.steps) == (
      96, 5, "mqar", 7)
  assert cfg.optimizer.lr == Config().optimizer.lr  # untouched keys keep defaults


def test_dotted_overrides_scalars_and_lists():
  cfg = configs.load(os.path.join(ROOT, "base.yaml"), [
      "optimizer.lr=3e-4", "model.n_layers=3", "train.run_dir=/tmp/x",
      "model.mixer=[attention,{name: attention, num_kv_heads: 1}]"])
  assert cfg.optimizer.lr == pytest.approx(3e-4)
  assert cfg.model.mixer[0] == "attention"
  assert dict(cfg.model.mixer[1]) == {"name": "attention", "num_kv_heads": 1}
  assert [s[1] for s in cfg.model.mixer_specs()] == [{}, {"num_kv_heads": 1}, {}]


@pytest.mark.parametrize("override, match", [
    ("model.d_modle=3", r"model\.d_modle.*Did you mean 'model\.d_model'"),
    ("trian.steps=3", r"'trian'.*Did you mean 'train'"),
    ("optimizer.lr=fast", r"optimizer\.lr"),
    ("train.steps=[1,2]", r"train\.steps"),
])
def test_bad_override_names_key_and_closest_match(override, match):
  with pytest.raises(configs.ConfigError, match=match):
    configs.load([], [override])


def test_bad_key_in_file_names_the_file(tmp_path):
  path = write(tmp_path, "bad.yaml", "data:\n  seq_lenn: 64\n")
  with pytest.raises(configs.ConfigError, match=r"bad\.yaml.*data\.seq_lenn.*'data\.seq_len'"):
    configs.load(path)


def test_bad_mixer_option_comes_from_registry():
  with pytest.raises(ConfigError, match="model.mixer: .*num_head.*Did you mean 'num_heads'"):
    configs.load([], ["model.mixer={name: attention, num_head: 2}"])


def test_override_without_equals_is_an_error():
  with pytest.raises(configs.ConfigError, match="key=value"):
    configs.load([], ["optimizer.lr"])


def test_saved_resolved_config_loads_back_equal(tmp_path):
  cfg = configs.load(os.path.join(ROOT, "tiny.yaml"),
                     ["model.mixer=[attention,{name: attention, num_heads: 2}]"])
  path = configs.save(cfg, str(tmp_path / "run"))
  assert os.path.basename(path) == "config.yaml"
  assert configs.load(path) == cfg


def test_every_registered_mixer_loads_by_name_at_the_tiny_scale():
  # What the sweep's `mixer: registered` axis runs: model.mixer=<name>.
  for name in mixers.names():
    cfg = configs.load(os.path.join(ROOT, "tiny.yaml"), [f"model.mixer={name}"])
    assert cfg.model.mixer_specs()[0][0] == name


def test_hybrid_configs_load_when_their_mixers_are_registered():
  registered = set(mixers.names())
  for f in sorted(os.listdir(os.path.join(ROOT, "hybrids"))):
    node = configs.compose([os.path.join(ROOT, "hybrids", f)])
    # A pattern entry is a name or {name: ..., **options}.
    names = {s if isinstance(s, str) else s["name"] for s in node.model.mixer}
    if names <= registered:
      specs = configs.to_config(node).model.mixer_specs()
      assert len({name for name, _ in specs}) >= 2, f"{f} is not a hybrid"


def test_defaults_and_every_config_file_are_valid():
  assert Config() == configs.load([])
  for sub in ("", "tasks"):
    folder = os.path.join(ROOT, sub)
    for f in sorted(os.listdir(folder)):
      if f.endswith(".yaml"):
        configs.load(os.path.join(folder, f))


def test_direct_construction_checks_types_and_values():
  with pytest.raises(ConfigError, match="train.steps='3' must be int, not str"):
    TrainConfig(steps="3")
  with pytest.raises(ConfigError, match=r"train.eval_lengths=\(1, 0\) must be a list of values >= 1"):
    TrainConfig(eval_lengths=(1, 0))
  with pytest.raises(ConfigError, match="mesh.rules: sharding rule 'embed' -> 'model'"):
    MeshConfig(rules={"embed": "model"})
  with pytest.raises(ConfigError, match=r"model.logit_softcap=-1.0 must be null or > 0"):
    LMConfig(logit_softcap=-1.0)


def test_errors_say_which_file_set_the_bad_value(tmp_path):
  base = write(tmp_path, "base.yaml", "train: {steps: 0}\n")
  mqar = write(tmp_path, "mqar.yaml", "data: {task: mqar, num_kv_pairs: 8, seq_len: 64}\n")
  with pytest.raises(ConfigError, match=r"^.*base\.yaml: train\.steps=0 must be >= 1$"):
    configs.load(base)
  # A rule across keys set in different places names each key's source.
  with pytest.raises(ConfigError, match=r"data\.seq_len from command-line override; "
                     r"data\.num_kv_pairs from .*mqar\.yaml: mqar: data\.seq_len=16"):
    configs.load(mqar, ["data.seq_len=16"])
  with pytest.raises(ConfigError, match=r"model\.vocab_size from command-line override; "
                     r"data\.task from the defaults: model\.vocab_size=16 is smaller"):
    configs.load([], ["model.vocab_size=16"])
