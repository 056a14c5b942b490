"""Task specs: a task is data plus a TOML file (labels, verbalizers, templates), never code.

A spec names where the labelled data comes from (a file inside an installed package, or a
local CSV/JSONL), the label names with the word the LLM answers with (the verbalizer), a
description used to fill the generation templates, several generation templates (for
diversity) and a classification template. Built-in specs live in ``crosslm_shared/task_specs``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from crosslm_shared.errors import ConfigError


@dataclass(frozen=True)
class Label:
    name: str
    verbalizer: str
    description: str


@dataclass(frozen=True)
class DataSource:
    """Where the labelled examples come from.

    ``package``+``file``: a file inside an installed distribution (found without importing it);
    ``path``: a local file. Formats: csv/tsv (``text_field``, ``label_field``), jsonl, or
    ``label_prefix`` (lines ``LABEL<sep>text``, the label cut at ``label_sep``).
    """

    format: Literal["csv", "tsv", "jsonl", "label_prefix"]
    text_field: str = "text"
    label_field: str = "label"
    package: str | None = None
    file: str | None = None
    path: str | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    label_sep: str = ":"
    encoding: str = "utf-8"
    dedup: bool = True

    def __post_init__(self) -> None:
        if self.format not in ("csv", "tsv", "jsonl", "label_prefix"):
            raise ConfigError(
                f"data.format = {self.format!r} is not supported; use one of csv, tsv, jsonl, label_prefix"
            )
        if not self.path and not (self.package and self.file):
            raise ConfigError("data needs either `path` or both `package` and `file`")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[Label, ...]
    generation_templates: tuple[str, ...]
    generation_prefix: str
    closing_mark: str
    classification_template: str
    answer_prefix: str
    data: DataSource
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ConfigError(f"task {self.name!r} has {len(self.labels)} labels; a task needs at least 2")
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ConfigError(f"task {self.name!r} repeats a label name: {names}")
        verbs = [lab.verbalizer.strip().lower() for lab in self.labels]
        if len(set(verbs)) != len(verbs):
            raise ConfigError(f"task {self.name!r} repeats a verbalizer: {verbs}")
        if not self.generation_templates:
            raise ConfigError(f"task {self.name!r} has no generation_templates")
        for t in self.generation_templates:
            if "{description}" not in t:
                raise ConfigError(
                    f"generation template {t!r} of task {self.name!r} lacks the {{description}} placeholder"
                )
        if "{text}" not in self.classification_template:
            raise ConfigError(f"classification_template of task {self.name!r} lacks the {{text}} placeholder")
        if not self.closing_mark:
            raise ConfigError(f"task {self.name!r}: closing_mark must not be empty")

    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def generation_prompts(self, label: int) -> list[str]:
        """Every instruction for ``label`` (one per template), for diverse label-conditioned prompts."""
        lab = self.labels[label]
        return [t.format(description=lab.description, label=lab.name) for t in self.generation_templates]

    def classification_prompt(self, text: str) -> str:
        return self.classification_template.format(text=text)


def builtin_tasks() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("crosslm_shared.task_specs").iterdir() if p.name.endswith(".toml"))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """Load a task by built-in name (``rotten_tomatoes``) or from a TOML path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        raw = tomllib.loads(path.read_text())
    else:
        ref = resources.files("crosslm_shared.task_specs") / f"{name_or_path}.toml"
        if not ref.is_file():
            raise ConfigError(
                f"task {str(name_or_path)!r} is neither a TOML file nor a built-in task; "
                f"built-ins: {', '.join(builtin_tasks())}"
            )
        raw = tomllib.loads(ref.read_text())
    return parse_task(raw)


def parse_task(raw: dict) -> TaskSpec:
    try:
        labels = tuple(
            Label(name=lab["name"], verbalizer=lab.get("verbalizer", lab["name"]),
                  description=lab.get("description", lab["name"]))
            for lab in raw["labels"]
        )
        gen = raw["generation"]
        cls = raw["classification"]
        data = DataSource(**raw["data"])
        return TaskSpec(
            name=raw["name"],
            labels=labels,
            generation_templates=tuple(gen["templates"]),
            generation_prefix=gen.get("prefix", ""),
            closing_mark=gen.get("closing_mark", '"'),
            classification_template=cls["template"],
            answer_prefix=cls.get("answer_prefix", "Answer:"),
            data=data,
            system_prompt=raw.get("system_prompt", ""),
        )
    except KeyError as e:
        raise ConfigError(f"task spec is missing the key {e.args[0]!r}") from e
    except TypeError as e:
        raise ConfigError(f"task spec has an unknown or malformed key: {e}") from e
