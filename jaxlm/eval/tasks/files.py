"""Records -> an lm-eval task directory: one JSONL file per split and the task's YAML, which reads
them with `dataset_path: json` (no download). `data_files` are absolute paths: lm-eval reads
relative ones from the working directory, not from the YAML's. A task directory is written
whole or not at all (a temporary directory renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml


class _Dumper(yaml.SafeDumper):
    """Strings with a newline in double quotes ("\\n"), as people write lm-eval task files."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s,
                                                                       style='"' if "\n" in s else None))


def write_task(out_dir: Path, name: str, config: dict, splits: dict[str, list[dict]]) -> Path:
    """out_dir/name/{split}.jsonl and out_dir/name/name.yaml: `config` plus the dataset keys."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for split, records in splits.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        files = {split: str((final / f"{split}.jsonl").absolute()) for split in splits}
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, **config}
        text = yaml.dump(task, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
        (tmp / f"{name}.yaml").write_text(text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def metric(name: str, **options) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True, **options}


NEXT_LINE = {
    "output_type": "multiple_choice", "training_split": "train", "validation_split": "validation",
    "fewshot_split": "train", "doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "label",
    "target_delimiter": "", "metric_list": [metric("acc"), metric("acc_norm")],
}
ARITHMETIC = {
    "output_type": "generate_until", "training_split": "train", "test_split": "test", "fewshot_split": "train",
    "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "target_delimiter": "", "fewshot_delimiter": "\n",
    "num_fewshot": 3, "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 8},
    "metric_list": [metric("exact_match")],
}
