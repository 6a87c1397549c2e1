"""Template and parameters files as text: JSON as AIB's REST API takes it, or as ARM reads its deployment
templates and parameters files (`az deployment`, `New-AzResourceGroupDeployment`): with `//` and `/* */`
comments and strings that span lines. A JSON error names the file, line and column, with a hint when the cause
is a trailing comma or a comment where JSON allows none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from workflows.template.errors import TemplateError, TemplateIssue

# A string, or a comment: strings are matched first so that `//` inside one (a URL) is left alone.
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|/\*.*?(?:\*/|\Z)', re.DOTALL)


def without_comments(text: str) -> str:
    """`text` with every comment blanked out: newlines kept, other characters made spaces, so that a JSON error
    in what is left has the line and column it has in the file."""

    def blank(match: re.Match[str]) -> str:
        found = match.group()
        return found if found.startswith('"') else re.sub(r"[^\n]", " ", found)

    return _STRING_OR_COMMENT.sub(blank, text)


def _hint(text: str, position: int) -> str:
    """Why JSON stopped at `position`, when it is a mistake people make: a comment, or a trailing comma."""
    if text.startswith(("//", "/*"), position):
        return (
            " JSON has no comments: an image template goes to AIB as it is; only ARM deployment templates and "
            "parameters files may have // and /* */ comments."
        )
    before = len(text[:position].rstrip()) - 1
    if before >= 0 and text[before] == "," and text.startswith(("}", "]"), position):
        line = text.count("\n", 0, before) + 1
        column = before - (text.rfind("\n", 0, before) + 1) + 1
        return (
            f" Remove the trailing comma at line {line}, column {column}: JSON allows no ',' before '{text[position]}'."
        )
    return ""


def _invalid(source: str, text: str, err: json.JSONDecodeError) -> TemplateError:
    message = f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.{_hint(text, err.pos)}"
    return TemplateError([TemplateIssue(path="", message=message)])


def parse_json(text: str, *, source: str, comments_allowed: Callable[[Any], bool]) -> Any:
    """The JSON document in `text`; read as ARM reads it (comments, multi-line strings) when the document is
    one `comments_allowed` says may have them.

    Args:
        text: the file's text.
        source: the file, as messages name it.
        comments_allowed: whether a document (as read with its comments left out) may have comments.

    Raises:
        TemplateError: invalid JSON, naming `source`, the line and the column, with a hint where one helps.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as plain_error:
        stripped = without_comments(text)
        try:
            document = json.loads(stripped, strict=False)
        except json.JSONDecodeError as err:
            raise _invalid(source, stripped, err) from None
        if comments_allowed(document):
            return document
        raise _invalid(source, text, plain_error) from None
