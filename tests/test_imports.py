"""The layering, read from the source (AST, nothing imported): train ->
arches -> layers and never back, and no import cycle inside train/.
Imports inside functions count (a lazy import still closes a circle at
run time); imports under `if TYPE_CHECKING:` do not."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _is_type_checking(node: ast.If) -> bool:
  t = node.test
  return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
      isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
  """Dotted names this module imports at run time (`from a import b` gives
  a.b, which may be a module or a name in a)."""
  found = set()
  todo = list(ast.iter_child_nodes(tree))
  while todo:
    node = todo.pop()
    if isinstance(node, ast.If) and _is_type_checking(node):
      todo += node.orelse
      continue
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's package
        parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
        base = ".".join(parts + ([base] if base else []))
      found |= {base} | {f"{base}.{a.name}" for a in node.names}
    todo += ast.iter_child_nodes(node)
  return found


def import_graph(root: str, packages: tuple[str, ...]) -> dict[str, set[str]]:
  """{module: modules of `packages` it imports} for every .py under them."""
  modules, trees = {}, {}
  for pkg in packages:
    for dirpath, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          parts = os.path.relpath(path, root)[:-3].split(os.sep)
          is_package = parts[-1] == "__init__"
          name = ".".join(parts[:-1] if is_package else parts)
          modules[name] = is_package
          with open(path) as fh:
            trees[name] = ast.parse(fh.read(), path)
  graph = {}
  for name, tree in trees.items():
    wanted = _imported(tree, name, modules[name])
    # `from train import plots` names the module train.plots, not train.
    graph[name] = {m for m in wanted if m in modules and m != name and not any(
        w.startswith(m + ".") and w in modules for w in wanted)}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


GRAPH = import_graph(ROOT, ("layers", "arches", "train"))


@pytest.mark.parametrize("lower,upper", [("layers", ("arches", "train")), ("arches", ("train",))])
def test_dependencies_point_down_only(lower, upper):
  wrong = {m: sorted(d for d in deps if d.split(".")[0] in upper)
           for m, deps in GRAPH.items() if m.split(".")[0] == lower}
  assert not {m: d for m, d in wrong.items() if d}, f"{lower}/ imports {upper}"


def test_no_import_cycle_inside_train():
  train = {m: {d for d in deps if d.split(".")[0] == "train"}
           for m, deps in GRAPH.items() if m.split(".")[0] == "train"}
  assert len(train) > 10  # the walk found the package
  assert cycles(train) == []


def test_the_checks_catch_a_planted_cycle_and_an_upward_import(tmp_path):
  pkg = tmp_path / "train"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from train.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from train import a  # lazy\n")
  (pkg / "c.py").write_text(
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from train import a\n")
  (tmp_path / "layers").mkdir()
  (tmp_path / "layers" / "m.py").write_text("from . import n\nimport train.c\n")
  (tmp_path / "layers" / "n.py").write_text("")
  graph = import_graph(str(tmp_path), ("layers", "train"))
  assert cycles(graph) == [["train.a", "train.sub.b"]]
  assert graph["train.c"] == set()  # type-only imports do not count
  assert graph["layers.m"] == {"layers.n", "train.c"}
