"""A small static reader for the project's Dockerfiles and .dockerignore (no Docker engine here).

It understands what the images use: line continuations, comments, ARG defaults with per-stage scope,
exec-form ENTRYPOINT, LABEL key=value pairs and `pip install` requirement lists.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# pip options that take a value: their value is not a requirement.
_PIP_VALUE_OPTIONS = {"--extra-index-url", "--index-url", "-i", "-r", "--requirement", "-c", "--constraint",
                      "-f", "--find-links", "--report", "--target", "-t", "--prefix"}


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    args: dict[str, str | None] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def expand(self, text: str) -> str:
        """Substitute ARG/ENV references visible in this stage; unknown ones raise (a real build bug)."""
        def sub(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            if name == "PATH":  # ENV PATH=/opt/venv/bin:$PATH
                return "$PATH"
            if name not in self.args or self.args[name] is None:
                raise KeyError(f"${{{name}}} is used but not declared with a default in stage {self.name or self.base}")
            return self.args[name]
        return _VAR.sub(sub, text)


def instructions(text: str) -> list[Instruction]:
    out, buf, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments are dropped, also inside continuations (as Docker does)
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, value = buf.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _arg(value: str) -> tuple[str, str | None]:
    name, eq, default = value.partition("=")
    return name, (default.strip('"') if eq else None)


def _env_pairs(value: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(value) if "=" in token)


def stages(text: str) -> list[Stage]:
    """Stages in order, with ARG scope as Docker applies it: global ARGs only in FROM unless redeclared."""
    global_args: dict[str, str | None] = {}
    result: list[Stage] = []
    for ins in instructions(text):
        if ins.keyword == "ARG" and not result:
            name, default = _arg(ins.value)
            global_args[name] = default
        elif ins.keyword == "FROM":
            parts = ins.value.split()
            base = Stage("", None, dict(global_args)).expand(parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append(Stage(base, name))
        else:
            stage = result[-1]
            if ins.keyword == "ARG":
                name, default = _arg(ins.value)
                stage.args[name] = default if default is not None else global_args.get(name)
            elif ins.keyword == "ENV":
                stage.args.update(_env_pairs(stage.expand(ins.value)))
            stage.instructions.append(ins)
    return result


def labels(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in stage.all("LABEL"):
        out.update(_env_pairs(stage.expand(ins.value)))
    return out


def exec_form(stage: Stage, keyword: str) -> list[str] | None:
    found = stage.all(keyword)
    if not found:
        return None
    value = json.loads(found[-1].value)  # shell form is not JSON: fails loudly
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def pip_requirements(stage: Stage) -> list[str]:
    """Every requirement given to `pip install` in the stage's RUN lines (ARGs expanded)."""
    reqs: list[str] = []
    for ins in stage.all("RUN"):
        for command in re.split(r"&&|;", stage.expand(ins.value)):
            words = shlex.split(command)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]  # VAR=value prefixes of the command
            if "pip" not in " ".join(words[:1]) or words[1:2] != ["install"]:
                continue
            skip = False
            for word in words[2:]:
                if skip:
                    skip = False
                elif word in _PIP_VALUE_OPTIONS:
                    skip = True
                elif not word.startswith("-"):
                    reqs.append(word)
    return reqs


def _ignore_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore(text: str):
    """A predicate path -> True when the path is in the build context (last matching pattern wins; a
    pattern that matches a parent folder matches everything under it)."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _ignore_regex(line.lstrip("!"))))

    def included(path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        keep = True
        for negated, regex in rules:
            if any(regex.match(p) for p in prefixes):
                keep = negated
        return keep

    return included
