"""Incremental detokenization for streaming, with stop strings.

:class:`IncrementalDetokenizer` turns a request's output token ids into text
deltas as they are generated. It decodes only a short window of recent tokens
per step (the prefix-offset / read-offset technique of vLLM and TGI):

* ``ids[prefix_offset:read_offset]`` is text that was already emitted, decoded
  again as context; ``ids[prefix_offset:]`` adds the new tokens. The delta is
  the difference of the two decodes, which is right even for decoders whose
  output for a token depends on its neighbours.
* A byte-level BPE token can end in the middle of a UTF-8 character; decoding
  then ends in U+FFFD. Such tokens are held back (the offsets do not move)
  until a later token completes the character, so no delta ever shows a
  replacement character for a split character.

The first window starts a few tokens into the prompt, so the first output
token is decoded with context, as in vLLM.

Stop strings (``SamplingParams.stop``): after each token the text is searched
for a stop string ending in the new region (the new text plus up to
``len(stop) - 1`` earlier characters). On a match the output is cut before the
stop string (after it with ``include_stop_str_in_output``), ``stop_reason`` is
set and later tokens are ignored. When several stop strings match, the one
that ends first wins (what a character-by-character check would find), so the
result does not depend on how tokens are grouped into ``add`` calls. As in
vLLM, stop strings are not checked before ``min_tokens`` tokens were added.
Unless the stop string is to be included, a tail of the text that could be
the start of a stop string is held back from the deltas until it is
disambiguated, so a streaming client never sees part of a stop string;
:meth:`IncrementalDetokenizer.finish` releases it when the request ends for
another reason.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

from engine.sampling_params import SamplingParams

# Prompt tokens decoded as context for the first output tokens (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams one completion's text: ``add`` per step returns the new text, ``finish`` the rest."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        # Decode window: prompt context, then output tokens; offsets index into it.
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = list(params.stop)
        self._stop_first_chars = {s[0] for s in self._stops}
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._text = ""  # all output text decoded so far; cut at the stop string once stopped
        self._emitted = 0  # characters of _text already returned
        self.stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        """The completion's text so far, including any held-back tail."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated tokens; return the text that may be shown now.

        After a stop string matched (``stopped``), further tokens are ignored.
        """
        for token_id in token_ids:
            if self.stopped:
                break
            self._ids.append(token_id)
            self._num_tokens += 1
            scan_from = len(self._text)
            self._text += self._decode_ready()
            self._check_stop(scan_from)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The request ended (length, stop token, abort): flush held-back and undecoded text.

        Undecoded bytes of an incomplete character come out as U+FFFD, exactly as
        a full decode would show them. A stop string completed by the flushed
        text is still honoured.
        """
        if not self.stopped:
            scan_from = len(self._text)
            self._text += self._decode_rest()
            self._check_stop(scan_from)
        return self._release(final=True)

    def _decode_window(self) -> tuple[str, str]:
        """(already emitted context text, context + pending tokens text)."""
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=skip)
        return prefix, full

    def _decode_ready(self) -> str:
        """Text of the pending tokens if it ends on a complete character, else ``""`` (held)."""
        prefix, full = self._decode_window()
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return ""
        self._advance()
        return full[len(prefix):]

    def _decode_rest(self) -> str:
        """Text of the pending tokens whatever it ends with."""
        prefix, full = self._decode_window()
        self._advance()
        return full[len(prefix):]

    def _advance(self) -> None:
        """Mark all tokens read; keep only the new context in the window."""
        del self._ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _check_stop(self, scan_from: int) -> None:
        """Cut ``_text`` at the earliest-ending stop string that ends after ``scan_from``."""
        if not self._stops or self._num_tokens < self._min_tokens:
            return
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stops:
            start = self._text.find(stop, max(0, scan_from - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            end, start, stop = best
            self._text = self._text[:end if self._include_stop else start]
            self.stop_reason = stop

    def _release(self, final: bool) -> str:
        """Return the not yet emitted text, minus a tail that may begin a stop string."""
        hold = 0 if final or self._include_stop else self._partial_stop_length()
        end = len(self._text) - hold
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta

    def _partial_stop_length(self) -> int:
        """Length of the longest unemitted suffix of the text that is a proper prefix of a stop string."""
        text = self._text
        longest_stop = max((len(s) for s in self._stops), default=0)
        for i in range(max(self._emitted, len(text) - longest_stop + 1), len(text)):
            if text[i] in self._stop_first_chars:
                suffix = text[i:]
                if any(stop.startswith(suffix) for stop in self._stops):
                    return len(text) - i
        return 0
