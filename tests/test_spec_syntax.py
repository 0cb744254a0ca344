"""YAML syntax errors in specs: the message names the line where the mistake was made, not only where it surfaced."""

from __future__ import annotations

import pytest

from mmhub.errors import SpecError
from mmhub.spec import parse_text


@pytest.mark.parametrize(("text", "opened", "noticed"), [
    ("name: x\nencoders: [a, b\nbackbone: {type: y}\nstages: []\n", "line 2, column 11", "line 3"),
    ('name: "abc\nbackbone: {type: y}\nstages: []\n', "line 1, column 7", "line 4"),
])
def test_unclosed_bracket_or_quote_reports_the_line_it_was_opened_on(text: str, opened: str, noticed: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_text(text, "bad.yaml")
    msg = str(exc.value)
    assert f"started at {opened}" in msg and f"at {noticed}, column" in msg and "bad.yaml" in msg
    assert f"check line {opened.split(',')[0].split()[1]} first" in msg


def test_error_on_one_line_reports_that_line_only() -> None:
    with pytest.raises(SpecError, match=r"line 2, column 7: mapping values are not allowed (here|in this context) "
                                        r"\(fix: fix the syntax"):
        parse_text("name: x\nfoo: a: b\n", "bad.yaml")
