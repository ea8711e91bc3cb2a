"""Small text helpers shared by the graders."""
from __future__ import annotations

THINK_CLOSE = "</think>"


def answer_part(response: str) -> str:
    """The text after the last closing think tag (the whole response when there is none)."""
    cut = response.rfind(THINK_CLOSE)
    return response[cut + len(THINK_CLOSE):] if cut >= 0 else response


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` / ``\fbox{...}`` in order, nested braces balanced.

    ``\boxed 5`` (no braces, as some models write) gives ``5``. An unclosed box at the very end is ignored.
    """
    found: list[str] = []
    i = 0
    while True:
        starts = [p for p in (text.find("\\boxed", i), text.find("\\fbox", i)) if p >= 0]
        if not starts:
            return found
        start = min(starts)
        j = start + (6 if text.startswith("\\boxed", start) else 5)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                if text[k] == "\\" and k + 1 < len(text) and text[k + 1] in "{}":
                    k += 2  # escaped brace: literal
                    continue
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        found.append(text[j + 1:k].strip())
                        break
                k += 1
            else:
                return found  # unclosed: stop
            i = k + 1
        elif j > start + 5 and j < len(text) and text[start + 6:j] != "":  # "\boxed 5"
            k = j
            while k < len(text) and not text[k].isspace() and text[k] not in "$.,;":
                k += 1
            if k > j:
                found.append(text[j:k])
            i = k
        else:
            i = j


def last_boxed(text: str) -> str | None:
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None
