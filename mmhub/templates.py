"""Chat templates: a conversation -> text segments marked as trained-on or not.

Each template renders ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}])
into segments ``(text, is_target)``; only assistant replies (and their end-of-turn
marker) are targets, so the loss never sees prompts or placeholders. ``tokenizer``
uses the tokenizer's own Jinja chat template (targets found by rendering growing
prefixes of the conversation); ``auto`` picks the tokenizer's own when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mmhub.errors import MMHubError, Problem, close_matches

Segment = tuple[str, bool]
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    """A format-string chat template. ``{eos}``/``{bos}`` expand to the tokenizer's tokens."""

    name: str
    system: str = ""
    system_fmt: str = "{system}"
    user_fmt: str = "{content}"
    assistant_prefix: str = ""
    assistant_fmt: str = "{content}{eos}"
    add_bos: bool = True
    system_in_first_user: bool = False  # llama-2 puts <<SYS>> inside the first [INST]
    required_tokens: tuple[str, ...] = ()  # must each be one token in the tokenizer
    stop: tuple[str, ...] = ("{eos}",)
    needs: tuple[str, ...] = ("eos",)  # tokenizer attributes that must be set (bos/eos)

    def render(self, messages: Sequence[dict[str, str]], tokenizer: Any,
               add_generation_prompt: bool = False) -> list[Segment]:
        """Conversation -> [(text, is_target)]; with `add_generation_prompt` ends ready for the reply."""
        fill = {"eos": tokenizer.eos_token or "", "bos": tokenizer.bos_token or ""}
        segs: list[Segment] = []
        if self.add_bos and tokenizer.bos_token:
            segs.append((tokenizer.bos_token, False))
        system = next((m["content"] for m in messages if m["role"] == "system"), self.system)
        sys_text = self.system_fmt.format(system=system, **fill) if system else ""
        if sys_text and not self.system_in_first_user:
            segs.append((sys_text, False))
            sys_text = ""
        for m in messages:
            role = m["role"]
            if role == "system":
                continue
            if role == "user":
                content, sys_text = sys_text + self.user_content(m["content"], fill), ""
                prompt = self.user_fmt.format(content=content, **fill) + self.assistant_prefix.format(**fill)
                segs.append((prompt, False))
            elif role == "assistant":
                segs.append((self.assistant_fmt.format(content=m["content"], **fill), True))
            else:
                raise MMHubError(f"message role {role!r} is not one of system/user/assistant (template {self.name}).")
        if not add_generation_prompt and messages and messages[-1]["role"] == "user":
            # a trailing user turn without a reply: keep only the user text
            text, _ = segs[-1]
            if self.assistant_prefix:
                text = text[: len(text) - len(self.assistant_prefix.format(**fill))]
            segs[-1] = (text, False)
        return segs

    def user_content(self, content: str, fill: dict[str, str]) -> str:
        """A user turn's text before `user_fmt` wraps it (`MediaTemplate` lays out its media markers here)."""
        return content

    def stop_strings(self, tokenizer: Any) -> list[str]:
        fill = {"eos": tokenizer.eos_token or "", "bos": tokenizer.bos_token or ""}
        return [s.format(**fill) for s in self.stop if s.format(**fill)]


@dataclass(frozen=True)
class MediaTemplate(Template):
    """A `Template` that lays out the media markers of user turns the way a family's processor does: every
    ``marker`` becomes ``around`` (Idefics3: ``<fake_token_around_image><global-img><image><fake_token_around_image>``),
    the bos token follows the last marker with ``bos_after_media`` (PaliGemma: images, bos, prompt; bos first when
    there is no marker), and ``sep`` starts a turn that does not open with a marker (Idefics3's "User: text" but
    "User:<image>text"). ``more_markers`` lays out other modalities' markers the same way (Qwen2-VL's video pad)."""

    marker: str = "<image>"
    around: str = "{marker}"
    bos_after_media: bool = False
    sep: str = ""
    more_markers: tuple[str, ...] = ()

    def user_content(self, content: str, fill: dict[str, str]) -> str:
        lead = "" if content.startswith(self.marker) else self.sep
        if self.bos_after_media:
            at = content.rfind(self.marker) + len(self.marker) if self.marker in content else 0
            content = content[:at] + fill["bos"] + content[at:]
        for other in self.more_markers:
            content = content.replace(other, self.around.format(marker=other))
        return lead + content.replace(self.marker, self.around.format(marker=self.marker))


@dataclass(frozen=True)
class LeadingMediaTemplate(MediaTemplate):
    """A `MediaTemplate` that moves a user turn's media markers in front of the turn and puts ``lead`` before its
    text (CogVLM's prompt: bos, the image tokens, then "Question: {text} Answer:")."""

    lead: str = ""

    def user_content(self, content: str, fill: dict[str, str]) -> str:
        marks = self.around.format(marker=self.marker) * content.count(self.marker)
        return marks + self.lead + content.replace(self.marker, "").strip()


@dataclass(frozen=True)
class NumberedMediaTemplate(MediaTemplate):
    """A `MediaTemplate` whose ``around`` numbers the turn's media items from 1 (``{n}``): Qwen-VL's
    "Picture {n}: <img>...</img>" lines."""

    def user_content(self, content: str, fill: dict[str, str]) -> str:
        pieces = content.split(self.marker)
        out = pieces[0]
        for n, rest in enumerate(pieces[1:], 1):
            out += self.around.format(marker=self.marker, n=n) + rest
        return out


@dataclass(frozen=True)
class SharedEdgeTemplate(MediaTemplate):
    """A `MediaTemplate` laying a user turn out as IDEFICS's processor lays out its prompt list: the text split at
    the markers, each piece stripped of spaces at its ends, each item between two ``edge`` tokens, an item right
    after another sharing the edge between them (``<fake><image><fake><image><fake>``)."""

    edge: str = ""

    def user_content(self, content: str, fill: dict[str, str]) -> str:
        pieces = content.split(self.marker)
        out, after_item = pieces[0].strip(" "), False
        for piece in pieces[1:]:
            out += self.marker + self.edge if after_item else self.edge + self.marker + self.edge
            out += piece.strip(" ")
            after_item = piece == ""
        return out


@dataclass(frozen=True)
class PrefixMediaTemplate(MediaTemplate):
    """A `MediaTemplate` for processors that put the media tokens in front of ``tokenizer(prompt)`` (BLIP-2,
    InstructBLIP): a user turn's leading markers (and the bos after them) become a segment of their own, so the text
    is tokenized alone, as the processor tokenizes it (a SentencePiece tokenizer then starts it with its word marker,
    which it does not do right after a special token)."""

    def render(self, messages: Sequence[dict[str, str]], tokenizer: Any,
               add_generation_prompt: bool = False) -> list[Segment]:
        bos = tokenizer.bos_token or "" if self.bos_after_media else ""
        out: list[Segment] = []
        for text, target in super().render(messages, tokenizer, add_generation_prompt):
            head = text
            while head.startswith(self.marker):
                head = head[len(self.marker):]
            if bos and head.startswith(bos):
                head = head[len(bos):]
            cut = len(text) - len(head)
            if target or cut == 0 or not head:
                out.append((text, target))
            else:
                out += [(text[:cut], False), (head, False)]
        return out


@dataclass(frozen=True)
class TokenizerTemplate:
    """The tokenizer's own Jinja chat template; targets found by diffing rendered prefixes."""

    name: str = "tokenizer"
    required_tokens: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("chat_template",)
    extra_stop: tuple[str, ...] = field(default=())

    def _apply(self, tokenizer: Any, messages: Sequence[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)

    def render(self, messages: Sequence[dict[str, str]], tokenizer: Any,
               add_generation_prompt: bool = False) -> list[Segment]:
        segs: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(tokenizer, messages[:i], gen=True)
            full = self._apply(tokenizer, messages[: i + 1], gen=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise MMHubError(
                    "the tokenizer's chat template is not prefix-consistent, so assistant turns cannot be located "
                    "for the loss; set `template:` to a named template (chatml, vicuna_v1, llama-2, plain).")
            segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        tail = self._apply(tokenizer, messages, gen=add_generation_prompt) if messages else ""
        if not tail.startswith(done):
            raise MMHubError("the tokenizer's chat template rewrites earlier turns; use a named template instead.")
        if tail[len(done):]:
            segs.append((tail[len(done):], False))
        return segs

    def stop_strings(self, tokenizer: Any) -> list[str]:
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
        template = tokenizer.chat_template or ""
        stops += [t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>") if t in template]
        return stops


TEMPLATES: dict[str, Any] = {
    "plain": Template(name="plain", add_bos=False, user_fmt="{content}", assistant_fmt="{content}{eos}"),
    "vicuna_v1": Template(name="vicuna_v1", system=VICUNA_SYSTEM, system_fmt="{system} ", user_fmt="USER: {content} ",
                          assistant_prefix="ASSISTANT:", assistant_fmt=" {content}{eos}", needs=("eos",)),
    "llama-2": Template(name="llama-2", system="", system_fmt="<<SYS>>\n{system}\n<</SYS>>\n\n",
                        system_in_first_user=True,
                        user_fmt="[INST] {content} [/INST]", assistant_fmt=" {content} {eos}", needs=("bos", "eos")),
    "chatml": Template(name="chatml", add_bos=False, system="You are a helpful assistant.",
                       system_fmt="<|im_start|>system\n{system}<|im_end|>\n",
                       user_fmt="<|im_start|>user\n{content}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
                       assistant_fmt="{content}<|im_end|>\n", required_tokens=("<|im_start|>", "<|im_end|>"),
                       stop=("<|im_end|>", "{eos}"), needs=()),
    "tokenizer": TokenizerTemplate(),
    # PaliGemma's processor: the <image> tokens, bos, the prompt, "\n"; the answer (suffix) then eos
    "paligemma": MediaTemplate(name="paligemma", add_bos=False, user_fmt="{content}\n", assistant_fmt="{content}{eos}",
                               bos_after_media=True, needs=("bos", "eos")),
    # Idefics3's chat template and processor (no image splitting): each <image> wrapped in its marker tokens
    "idefics3": MediaTemplate(name="idefics3", system_fmt="System: {system}<end_of_utterance>\n",
                              user_fmt="User:{content}<end_of_utterance>\n", assistant_prefix="Assistant:",
                              assistant_fmt=" {content}<end_of_utterance>\n", sep=" ",
                              around="<fake_token_around_image><global-img>{marker}<fake_token_around_image>",
                              required_tokens=("<end_of_utterance>", "<fake_token_around_image>"),
                              stop=("<end_of_utterance>", "{eos}"), needs=("bos", "eos")),
    # Qwen2-VL's chat template (chatml with its default system prompt): each image pad wrapped in its vision markers
    "qwen2-vl": MediaTemplate(name="qwen2-vl", add_bos=False, system="You are a helpful assistant.",
                              system_fmt="<|im_start|>system\n{system}<|im_end|>\n",
                              user_fmt="<|im_start|>user\n{content}<|im_end|>\n",
                              assistant_prefix="<|im_start|>assistant\n", assistant_fmt="{content}<|im_end|>\n",
                              marker="<|image_pad|>", around="<|vision_start|>{marker}<|vision_end|>",
                              more_markers=("<|video_pad|>",),
                              required_tokens=("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"),
                              stop=("<|im_end|>", "{eos}"), needs=()),
    # Qwen-VL-Chat's prompt (chatml with its default system prompt): each image between its <img> and </img> tokens
    # (its tokenizer's from_list_format: "Picture {n}: <img>...</img>\n" per image, numbered within the turn)
    "qwen-vl": NumberedMediaTemplate(name="qwen-vl", add_bos=False, system="You are a helpful assistant.",
                                     system_fmt="<|im_start|>system\n{system}<|im_end|>\n",
                                     user_fmt="<|im_start|>user\n{content}<|im_end|>\n",
                                     assistant_prefix="<|im_start|>assistant\n",
                                     assistant_fmt="{content}<|im_end|>\n", around="Picture {n}: <img>{marker}</img>\n",
                                     required_tokens=("<|im_start|>", "<|im_end|>", "<img>", "</img>"),
                                     stop=("<|im_end|>", "{eos}"), needs=()),
    # mPLUG-Owl's prompt (its README): the system line, each image on a "Human: <image>" line of its own, "AI: "
    "mplug-owl": MediaTemplate(name="mplug-owl", system="The following is a conversation between a curious human and "
                               "AI assistant. The assistant gives helpful, detailed, and polite answers to the user's "
                               "questions.", system_fmt="{system}\n", user_fmt="Human: {content}\n",
                               assistant_prefix="AI: ", assistant_fmt="{content}{eos}\n",
                               around="{marker}\nHuman: ", needs=("bos", "eos")),
    # BLIP-2 / InstructBLIP's processors: the image tokens, then tokenizer(prompt) (bos first for OPT/LLaMA/Vicuna;
    # "blip-2-t5": eos last for Flan-T5, whose encoder reads the prompt); the answer then eos
    "blip-2": PrefixMediaTemplate(name="blip-2", add_bos=False, user_fmt="{content}", assistant_fmt="{content}{eos}",
                                  bos_after_media=True, needs=("bos", "eos")),
    "blip-2-t5": PrefixMediaTemplate(name="blip-2-t5", add_bos=False, user_fmt="{content}{eos}",
                                     assistant_fmt="{content}{eos}", needs=("eos",)),
    # Video-LLaMA's demo conversation (Vicuna): "###Human: <Video>{tokens}</Video> {question}###Assistant:"
    "video-llama": MediaTemplate(name="video-llama", marker="<video>", around="<Video>{marker}</Video> ",
                                 user_fmt="###Human: {content}", assistant_prefix="###Assistant:",
                                 assistant_fmt=" {content}", stop=("###", "{eos}"), needs=("bos",)),
    # CogVLM's chat prompt (template_version "chat"): bos, the image tokens, "Question: {q} Answer:"; history turns
    # end with "\n"
    "cogvlm": LeadingMediaTemplate(name="cogvlm", user_fmt="{content} Answer:", lead="Question: ",
                                   assistant_fmt=" {content}{eos}\n", needs=("bos", "eos")),
    # CogVLM's base models (template_version "base"): bos, the image tokens, the query as it is
    "cogvlm-base": LeadingMediaTemplate(name="cogvlm-base", user_fmt="{content}", assistant_fmt="{content}{eos}",
                                        needs=("bos", "eos")),
    # IDEFICS's processor: bos, then the prompt pieces with each image as <fake><image><fake> (no chat format)
    "idefics": SharedEdgeTemplate(name="idefics", user_fmt="{content}", assistant_fmt="{content}{eos}",
                                  edge="<fake_token_around_image>", required_tokens=("<fake_token_around_image>",),
                                  needs=("bos", "eos")),
    "blip-2-video": PrefixMediaTemplate(name="blip-2-video", marker="<video>", add_bos=False, user_fmt="{content}",
                                        assistant_fmt="{content}{eos}", bos_after_media=True, needs=("bos", "eos")),
}


def resolve_template(name: str, tokenizer: Any) -> Any:
    """The template object for `name` (``auto``: the tokenizer's own, else chatml, else vicuna_v1)."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return TEMPLATES["tokenizer"]
        return TEMPLATES["chatml"] if not template_problems(TEMPLATES["chatml"], tokenizer) else TEMPLATES["vicuna_v1"]
    if name not in TEMPLATES:
        hint = close_matches(name, TEMPLATES)
        raise MMHubError(f"unknown chat template {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" Known templates: {', '.join(sorted(TEMPLATES))}, auto.")
    return TEMPLATES[name]


def template_problems(template: Any, tokenizer: Any, path: str = "template") -> list[Problem]:
    """Checks that `tokenizer` has what `template` needs (special tokens, bos/eos, a chat template)."""
    problems = []
    for attr in template.needs:
        if attr == "chat_template":
            if not getattr(tokenizer, "chat_template", None):
                problems.append(Problem(path, "template 'tokenizer' needs the tokenizer's own chat template, "
                                              "but this tokenizer has none",
                                    "name a template: chatml, vicuna_v1, llama-2 or plain"))
        elif getattr(tokenizer, f"{attr}_token", None) is None:
            problems.append(Problem(path, f"template {template.name!r} needs a {attr} token, "
                                          "but the tokenizer has none",
                                    "pick a template that does not need it (e.g. chatml) "
                                    "or use a tokenizer that defines it"))
    vocab = tokenizer.get_vocab()
    for tok in template.required_tokens:
        if tok not in vocab:
            problems.append(Problem(path, f"template {template.name!r} needs the special token {tok!r}, which the "
                                          f"tokenizer does not have as a single token",
                                    "use a template made for this tokenizer (`auto` picks its own), or vicuna_v1"))
    return problems
