"""lm-eval's task registry, with local task files, and its failures as one-line errors.

Names are looked up in --include-path first: when every one is there, lm-eval's own 14,000 task
files are never indexed (parsing them takes ~9 s). A name that is not even written in any of
them (a read, ~0.5 s) is refused at once; otherwise the index decides. A name found nowhere is
refused with the closest names; a YAML file under --include-path that does not parse is named (lm-eval would skip it
silently and then not find the task); a task whose file or data cannot be loaded (a missing
`data_files`, a dataset only on the Hub while offline, an unknown key) is refused naming the task,
its file and lm-eval's reason.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from jaxlm.errors import UserError


def split_names(tasks: str) -> list[str]:
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    if not names:
        raise UserError(f"--tasks {tasks!r}: expected comma-separated task names or task YAML files")
    return names


def check_include_path(include_path: str | None) -> None:
    """The directory exists, and each YAML file in it parses (a file that does not is refused:
    lm-eval would skip it without a word)."""
    if include_path is None:
        return
    root = Path(include_path)
    if not root.is_dir():
        raise UserError(f"--include-path {include_path}: no such directory; expected a directory of lm-eval task "
                        "YAML files")
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(root.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=False)
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
            reason = " ".join(str(e).split())
            raise UserError(f"{path}: not an lm-eval task file ({reason[:300]})") from None


NAME_LINE = re.compile(r"^\s*(?:task|group|tag)\s*:\s*[\"']?([\w.-]+)", re.M)


def builtin_texts() -> list[str]:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    return [p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*.yaml")]


def refuse_unknown(name: str, known: list[str], include_path: str | None) -> None:
    close = difflib.get_close_matches(name, known, n=3)
    where = f" or in --include-path {include_path}" if include_path else " (local task files need --include-path DIR)"
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"--tasks {name}: no such task among lm-eval's{where}{hint}")


def task_manager(names: list[str], include_path: str | None):
    """A TaskManager that knows every name: the local one alone when it suffices."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    missing = [n for n in names if not os.path.isfile(n) and (local is None or n not in local.all_tasks)]
    if not missing:
        return local
    texts = builtin_texts()
    for name in missing:
        if not any(name in text for text in texts):  # every built-in name is written in its YAML
            written = {m for text in texts for m in NAME_LINE.findall(text)}
            refuse_unknown(name, sorted(written | set(local.all_tasks if local else ())), include_path)
    manager = TaskManager(include_path=include_path)
    for name in missing:
        if name not in manager.all_tasks:
            refuse_unknown(name, manager.all_tasks, include_path)
    return manager


def load_tasks(manager, names: list[str]) -> list:
    """The Task and Group objects of `names`, datasets loaded; a failure names the task and why."""
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 -- lm-eval and datasets raise anything; the CLI says it in one line
            entry = manager.task_index.get(name)
            where = f" ({entry.yaml_path})" if entry is not None and entry.yaml_path else ""
            reason = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"task {name}{where} could not be loaded: {type(e).__name__}: {reason[:400]}") from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        else:
            built.extend(loaded["tasks"].values())
    return built
