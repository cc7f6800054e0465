"""The package's shape: no import cycles, no lower layer importing a higher one, small files.

Imports are read from the source (ast), every `import` and `from ... import` at any depth of a
module, except under `if TYPE_CHECKING:` (names for annotations, never run). A module that imports
`jaxlm.a.b` depends on `jaxlm.a.b` (not on the package `jaxlm.a`'s __init__ as well: Python runs
it first, but a package's __init__ only re-exports its own modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxlm"

# Lowest first. A module belongs to the layer of its longest matching prefix; it may import its
# own layer and the layers below it, never one above.
LAYERS = [
    ["jaxlm.errors", "jaxlm.cache_dir"],
    ["jaxlm.parallel"],  # mesh, sharding rules, determinism, backends: know nothing of the config tree
    ["jaxlm.config"],
    ["jaxlm.tokenizer"],
    ["jaxlm.model", "jaxlm.tools.accounting", "jaxlm.tools.devices"],  # accounting: FLOPs of a model config
    ["jaxlm.compress"],  # quantized weights (and pruning): transforms of a model's parameters
    ["jaxlm.data", "jaxlm.eval.tasks"],  # eval.tasks: offline task records (arithmetic too for RL); no JAX, no lm-eval
    ["jaxlm.checkpoint"],  # run directories: layout, manifest, orbax, resume, loading a run
    ["jaxlm.objectives"],  # losses over (model, batch, key, frozen); a teacher is read from a run
    ["jaxlm.export.params", "jaxlm.export.compat", "jaxlm.export.hf", "jaxlm.export.hf_config", "jaxlm.export.hf_load",
     "jaxlm.export.safetensors_read", "jaxlm.export.tokenizer_files", "jaxlm.export.hf_tokenizer_files",
     "jaxlm.export.gguf_vocab", "jaxlm.export.gguf", "jaxlm.export.atomic", "jaxlm.export.peft"],  # formats, no verbs
    ["jaxlm.train"],
    ["jaxlm.inference"],
    ["jaxlm.rl"],  # GRPO: rollouts with the decoder, rewards, the loop around the train step; `jaxlm rl`
    ["jaxlm.eval"],  # lm-evaluation-harness over the scorer and the decoder; `jaxlm eval`
    ["jaxlm.export", "jaxlm.tools"],  # the verbs that write other formats; compile, plot
    ["jaxlm.cli", "jaxlm"],
]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The jaxlm modules `path` imports (a `from pkg import mod` counts as importing pkg.mod)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxlm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("jaxlm"):
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := dfs(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := dfs(m)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"]


def test_no_layer_imports_a_higher_one():
    upward = [f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})"
              for m, deps in sorted(graph().items()) for n in sorted(deps) if layer_of(n) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_imports_are_read_lazy_ones_included_and_type_checking_ones_not(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jaxlm.train import step\n"
                   "def f():\n    from jaxlm.model import kernels\n    import jaxlm.errors\n")
    known = {"jaxlm.train.step", "jaxlm.model.kernels", "jaxlm.errors", "jaxlm.model"}
    assert imports_of(src, "jaxlm.x", known) == {"jaxlm.model.kernels", "jaxlm.errors"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_files_and_functions_stay_short(name):
    path = modules()[name]
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_FILE_LINES, f"{path} has {len(lines)} lines (split it by concern)"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
