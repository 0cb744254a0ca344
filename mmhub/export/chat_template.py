"""mmhub's named chat templates as Jinja chat templates, for exported tokenizers and processors.

`jinja_template` writes a Jinja template that renders a conversation to exactly the
text `mmhub.templates.Template.render` joins (same system handling, same generation
prompt, the tokenizer's bos/eos written in as literals), so a transformers processor
fed the same messages produces the same text as mmhub. Message content may be a
string (mmhub's form, placeholders written in the text) or a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items (transformers' form),
where each image item becomes the placeholder and a newline, as in mmhub's
``"<image>\\nWhat is this?"``. A model whose template is the tokenizer's own
(``tokenizer``) keeps that Jinja template unchanged. `named_template` is the
reverse: it recognises a template written here and gives back its mmhub name.
"""

from __future__ import annotations

import json
import string
from typing import Any

from mmhub.templates import TEMPLATES, MediaTemplate, Template


def _lit(text: str) -> str:
    """A Jinja string literal (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text)


def _expr(fmt: str, fill: dict[str, str], variables: dict[str, str]) -> str:
    """A `str.format` template -> a Jinja expression: literals and bos/eos as strings, other fields as variables."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(_lit(literal))
        if field is not None:
            parts.append(_lit(fill[field]) if field in fill else variables[field])
    return " ~ ".join(parts) if parts else '""'


def _emit(fmt: str, fill: dict[str, str], variables: dict[str, str]) -> str:
    expr = _expr(fmt, fill, variables)
    return "" if expr == '""' else "{{ " + expr + " }}"


def _content(placeholder: str) -> str:
    """Jinja that sets ``ns.text`` from ``m['content']`` (a string, or a list of image/text items)."""
    return ("{%- if m['content'] is string -%}{%- set ns.text = m['content'] -%}{%- else -%}{%- set ns.text = '' -%}"
            "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}"
            "{%- set ns.text = ns.text ~ " + _lit(placeholder + "\n") + " -%}"
            "{%- elif c['type'] == 'text' -%}{%- set ns.text = ns.text ~ c['text'] -%}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}")


def jinja_template(template: Any, tokenizer: Any, placeholder: str) -> str | None:
    """The Jinja chat template rendering like `template` with `tokenizer`'s bos/eos (None when there is none)."""
    if isinstance(template, MediaTemplate):  # its media layout (PaliGemma, Idefics3) is its processor's, not Jinja
        return None
    if not isinstance(template, Template):  # the tokenizer's own Jinja template
        return getattr(tokenizer, "chat_template", None) or None
    fill = {"eos": tokenizer.eos_token or "", "bos": tokenizer.bos_token or ""}
    out = ["{%- set ns = namespace(system=" + _lit(template.system) + ", found=false, pending='', text='') -%}",
           "{%- for m in messages -%}{%- if m['role'] == 'system' and not ns.found -%}"
           "{%- set ns.system = m['content'] -%}{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}"]
    if template.add_bos and fill["bos"]:
        out.append("{{ " + _lit(fill["bos"]) + " }}")
    if template.system_in_first_user:
        out.append("{%- if ns.system -%}{%- set ns.pending = "
                   + _expr(template.system_fmt, fill, {"system": "ns.system"})
                   + " -%}{%- endif -%}")
    else:
        out.append("{%- if ns.system -%}" + _emit(template.system_fmt, fill, {"system": "ns.system"}) + "{%- endif -%}")
    prefix = _emit(template.assistant_prefix, fill, {})
    out += ["{%- for m in messages -%}",
            "{%- if m['role'] == 'user' -%}", _content(placeholder),
            _emit(template.user_fmt, fill, {"content": "(ns.pending ~ ns.text)"}), "{%- set ns.pending = '' -%}",
            ("{%- if not loop.last or add_generation_prompt -%}" + prefix + "{%- endif -%}") if prefix else "",
            "{%- elif m['role'] == 'assistant' -%}", _content(placeholder),
            _emit(template.assistant_fmt, fill, {"content": "ns.text"}),
            "{%- elif m['role'] != 'system' -%}{{ raise_exception('message role ' ~ m['role'] ~ "
            + _lit(f" is not one of system/user/assistant (template {template.name})") + ") }}",
            "{%- endif -%}{%- endfor -%}"]
    return "".join(out)


def named_template(chat_template: str | None, tokenizer: Any, placeholder: str) -> str | None:
    """The mmhub template name whose `jinja_template` is exactly `chat_template`, or None."""
    if not chat_template:
        return None
    for name, template in TEMPLATES.items():
        if isinstance(template, Template) and jinja_template(template, tokenizer, placeholder) == chat_template:
            return name
    return None
