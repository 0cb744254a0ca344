"""Serial serving: one request at a time from the engine's queue, for models whose decoding cannot share a batch.

The `Engine` mixes this in; it runs each choice through `mmhub.streaming` (the model's own decode path, with its
fallbacks), so anything `MMModel.generate` can answer is served, just without continuous batching.
"""

from __future__ import annotations

import time
from typing import Any

from mmhub.inputs import prepare
from mmhub.serve.types import Request, as_error, cancelled_error, timeout_error


class SerialServing:
    """`_serve_alone` for the `Engine` (which supplies the model, stats and the row/text helpers)."""

    model: Any
    stats: Any

    def _serve_alone(self, request: Request) -> None:
        """Serial mode: each choice through `mmhub.streaming` (the model's own decode path)."""
        from mmhub.streaming import stream_reply

        s = request.sampling
        try:
            self._check_budget(request, self._prompt_tokens(request))
            for choice in range(request.n):
                settings: dict[str, Any] = {"max_new_tokens": s.max_tokens}
                if s.temperature > 0:
                    settings.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
                seed = (s.seed + choice) % 2**63 if s.seed is not None else None
                row, media = self._new_row(request, choice), {}
                for reply in stream_reply(self.model, request.messages, request.media, seed=seed, **settings):
                    now = time.monotonic()
                    if request.cancelled.is_set() or request.expired(now):
                        self._fail(request, timeout_error(request) if request.expired(now) else cancelled_error())
                        return
                    row.tokens = list(reply.token_ids)
                    if self._update_text(row, reply.text):
                        break
                    if reply.finish_reason is not None:
                        row.finish_reason, media = reply.finish_reason, reply.media
                self.stats.completion_tokens += len(row.tokens)
                self._finish(row, media)
        except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
            self._fail(request, as_error(exc))

    def _prompt_tokens(self, request: Request) -> int:
        """Serial mode's prompt length: the spliced prompt (media tokens included), computed once."""
        model = self.model
        b = model.batch([request.messages], [request.media], add_generation_prompt=True, padding_side="left")
        sp = prepare(model, b["input_ids"], b["attention_mask"], None, b["media"], padding_side="left").spliced
        request.prompt_tokens = int(sp.attention_mask[0].sum())
        self.stats.prompt_tokens += request.prompt_tokens
        return request.prompt_tokens
