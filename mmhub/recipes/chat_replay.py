"""Text-only replay turns for the real-weights recipe, so instruction tuning on easy-VQA keeps the chat model.

Tuning SmolLM2-135M-Instruct on easy-VQA's one-word answers alone taught it to answer every
short question with one word ("What is the capital of France?" -> "France"). The remedy is
self-distillation replay: plain prompts answered by the *base* model (greedy, so the file is
reproducible), mixed into the instruct data. The file ships beside this module
(``chat_replay.jsonl``, ShareGPT ``messages`` records); this module regenerates it:

    python -m mmhub.recipes.chat_replay [--out PATH] [--max-new-tokens N]

The held-out checks (``HELD_OUT``) are never in the file; the recipe's test asks them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmhub.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent
OUT = HERE / "chat_replay.jsonl"
HELD_OUT = ("What is the capital of France?", "Write one sentence about the sea.", "How many legs does a spider have?")

_TOPICS = ("the moon", "rain", "a library", "bread", "the ocean", "trees", "a bicycle", "music", "winter", "a city",
           "mountains", "coffee", "a river", "friendship", "the sun", "birds", "a garden", "snow", "a train", "books")
_FACTS = ("What is the capital of Italy?", "What is the capital of Japan?", "What is the capital of Spain?",
          "What is the capital of Germany?", "What is the capital of Canada?", "What is the largest planet?",
          "What is the boiling point of water in Celsius?", "How many days are in a week?",
          "How many continents are there?", "What gas do plants take in?", "Who wrote Romeo and Juliet?",
          "What is the chemical symbol for water?", "How many hours are in a day?",
          "What colour is the sky on a clear day?",
          "What is the freezing point of water?", "What do bees make?", "What is the opposite of hot?",
          "How many minutes are in an hour?", "What is the largest ocean?", "What language is spoken in Brazil?",
          "What is 2 plus 2?", "What is 10 times 3?", "What is the square root of 16?", "What animal says moo?",
          "Which planet is known as the red planet?", "What is the tallest animal?", "How many wheels does a car have?",
          "What do you call a baby cat?", "What is the main ingredient of guacamole?",
          "What is the fastest land animal?")
_TASKS = ("Give me three tips for better sleep.", "Explain what a computer is in simple words.",
          "Say hello in a friendly way.", "What should I eat for breakfast?", "Tell me a short joke.",
          "How do I make a cup of tea?", "Why is exercise good for you?", "What is a good name for a dog?",
          "Explain photosynthesis briefly.", "Suggest a weekend activity.", "What is machine learning?",
          "How can I learn a new language?", "Describe a rainbow.", "Why do we need water?",
          "Give one reason to read books.", "What is the difference between a cat and a dog?",
          "How do airplanes fly?", "What is a healthy snack?", "Translate 'thank you' into Spanish.",
          "Summarise the story of Cinderella in two sentences.")


def prompts() -> list[str]:
    """The fixed replay prompt list (facts, tasks, and short writing requests)."""
    out = list(_FACTS) + list(_TASKS)
    out += [f"Write one sentence about {t}." for t in _TOPICS]
    out += [f"What is {t}?" for t in _TOPICS[:10]]
    assert not set(out) & set(HELD_OUT)
    return out


def trim(answer: str) -> str:
    """Cut an answer that ran into the token limit back to its last full sentence (kept whole when it has none)."""
    a = answer.strip()
    if a.endswith((".", "!", "?")):
        return a
    cut = max(a.rfind(". "), a.rfind("! "), a.rfind("? "), a.rfind(".\n"))
    return a[:cut + 1] if cut > 0 else a


def base_model():
    """SmolLM2-135M-Instruct from the recipe, before any training (the teacher)."""
    from mmhub.assembly import build

    return build(str(HERE / "easyvqa-smollm2.yaml")).eval()


def generate(out: Path = OUT, max_new_tokens: int = 96, batch: int = 8) -> int:
    """Answer every prompt with the base model (greedy) and write ShareGPT records atomically."""
    model = base_model()
    ps = prompts()
    lines = []
    for i in range(0, len(ps), batch):
        chunk = ps[i:i + batch]
        for p, a in zip(chunk, model.generate(chunk, max_new_tokens=max_new_tokens), strict=True):
            messages = [{"role": "user", "content": p}, {"role": "assistant", "content": trim(a.text)}]
            lines.append(json.dumps({"messages": messages}))
        print(f"{len(lines)}/{len(ps)}", flush=True)
    write_text_atomic(out, "\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmhub.recipes.chat_replay", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    print(f"wrote {generate(args.out, args.max_new_tokens)} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
