"""The refusal detector: does a reply decline to answer about the picture?

A reply is a refusal when, lowercased (curly apostrophes made straight), it contains one of:

1. a statement of what the model is limited to: "can only ..." or "only (answer|talk|describe|know|see|
   understand|recognise|deal with) ..." ("I can only answer questions about simple coloured shapes");
2. a statement that it cannot answer: "cannot / can't / can not / unable to / not able to" followed by
   "tell, answer, say, determine, identify, describe, recognise/recognize, help" ("I cannot tell");
3. "don't know" / "do not know" / "not sure";
4. a statement that the picture is not what it handles: "not (a|an) simple ...", "not (a|an) easy-vqa ...",
   "does not / doesn't (show|contain|look like) (a|an|any) simple ...".

Deliberately not refusals: "I can't see a circle" (an answer: no), "There is no red shape", "It is not a circle",
one-word answers, an empty reply, and invented descriptions of any length.
"""

from __future__ import annotations

import re

PATTERNS = (
    re.compile(r"\bcan only\b|\bonly (answer|talk|describe|know|see|understand|recogni[sz]e|deal with)\b"),
    re.compile(r"\b(cannot|can't|can not|unable to|not able to)\s+(tell|answer|say|determine|identify|describe|"
               r"recogni[sz]e|help)\b"),
    re.compile(r"\b(don't|do not) know\b|\bnot sure\b"),
    re.compile(r"\bnot (a |an )?(simple|easy[- ]?vqa)\b|\b(does not|doesn't) (show|contain|look like) "
               r"(a |an |any )?simple\b"),
)


def is_refusal(reply: str) -> bool:
    """Whether `reply` declines to answer (see the module docstring for the exact rule)."""
    text = " ".join(reply.lower().replace("\u2019", "'").replace("\u2018", "'").split())
    return any(p.search(text) for p in PATTERNS)
