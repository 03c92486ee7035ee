"""How a text becomes the token ids a classifier reads: the one place prompts are formatted and encoded.

A classifier reads the text as it is (the default), or wrapped in a prompt template stored with it
(`--prompt-template`, `safety_classifier.json`'s `prompt_template`):

- `chat`: the tokenizer's own chat template, the text as the user's turn, followed by the start
  of the assistant's turn (`add_generation_prompt`), so the head reads the hidden state the model
  would answer from;
- any string with one `{text}` in it, such as `"User prompt: {text}\\nSafe or unsafe?"`.

Over-long texts lose their own tail, never the template's: the head reads the last token, which
with a template is the template's last token.

An answer is judged with the prompt it answers: a `PromptResponse` is encoded as one sequence with
roles (`RESPONSE_TEMPLATE`, or with `chat` the tokenizer's chat template with a user and an
assistant turn), so which task a row is can be read from its input and one classifier does both.
An over-long pair loses its response's tail first, then its prompt's, and each keeps at least half
of the room when it needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from .errors import PromptTemplateError

CHAT_TEMPLATE = "chat"
TEXT_PLACEHOLDER = "{text}"
_CHAT_SENTINEL = "SAFETYCLASSIFIERTEXTSLOT"
_CHAT_RESPONSE_SENTINEL = "SAFETYCLASSIFIERRESPONSESLOT"
PROMPT_PLACEHOLDER = "{prompt}"
RESPONSE_PLACEHOLDER = "{response}"
# Roles a base model has read in many transcripts; the closing question puts the judged turn last.
RESPONSE_TEMPLATE = "User: {prompt}\n\nAssistant: {response}\n\nIs the assistant's reply harmful?"


class PromptResponse(NamedTuple):
    """An AI answer with the prompt it answers; the verdict judges the answer."""

    prompt: str
    response: str


ModerationInput = str | PromptResponse


def normalise_input(value: object) -> ModerationInput:
    """A prompt (`normalise_prompt`) or a `PromptResponse` with both of its texts normalised."""
    if isinstance(value, PromptResponse):
        return PromptResponse(normalise_prompt(value.prompt), normalise_prompt(value.response))
    return normalise_prompt(value)


def judged_text(value: ModerationInput) -> str:
    """The text a verdict is about: the prompt, or the response of a pair."""
    return value.response if isinstance(value, PromptResponse) else value


def judged_part(value: ModerationInput) -> str:
    """Which text of an input a verdict is about: "prompt", or "response" for a `PromptResponse`."""
    return "response" if isinstance(value, PromptResponse) else "prompt"


def is_blank(value: ModerationInput) -> bool:
    """True for an empty or white-space judged text: it scores safe by definition, without a forward pass."""
    return not judged_text(value).strip()


def normalise_prompt(value: object) -> str:
    """Any value as text the tokenizer accepts: None and NaN become empty, other values str(),
    and code points that are not valid UTF-8 (lone surrogates) become U+FFFD."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Through UTF-16: a split surrogate pair becomes its character, a lone one U+FFFD.
        text = text.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")
    return text


def check_prompt_template(template: str | None) -> None:
    """Refuse a template that is neither `chat` nor a string with exactly one `{text}`."""
    if template is None or template == CHAT_TEMPLATE:
        return
    if template.count(TEXT_PLACEHOLDER) != 1:
        raise PromptTemplateError(f"a prompt template is {CHAT_TEMPLATE!r} or a string with exactly one "
                                  f"{TEXT_PLACEHOLDER} (where the text goes); got {template!r}")


def template_pieces(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str]:
    """(what comes before the text, what comes after it) under `template`."""
    check_prompt_template(template)
    if template != CHAT_TEMPLATE:
        before, _, after = template.partition(TEXT_PLACEHOLDER)
        return before, after
    if not getattr(tokenizer, "chat_template", None):
        raise PromptTemplateError(f"prompt template {CHAT_TEMPLATE!r}: this tokenizer has no chat template; "
                                  f"give a string with {TEXT_PLACEHOLDER} instead")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _CHAT_SENTINEL}],
                                             add_generation_prompt=True, tokenize=False)
    if rendered.count(_CHAT_SENTINEL) != 1:
        raise PromptTemplateError(f"prompt template {CHAT_TEMPLATE!r}: the tokenizer's chat template does not "
                                  f"place the user's message verbatim; give a string with {TEXT_PLACEHOLDER} instead")
    before, _, after = rendered.partition(_CHAT_SENTINEL)
    return before, after


@lru_cache(maxsize=16)
def _template_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[list[int], list[int]]:
    before, after = template_pieces(tokenizer, template)
    # A chat template writes its own special tokens (BOS included); a plain template gets the ones the
    # tokenizer adds to any text, at its start.
    before_ids = tokenizer(before, add_special_tokens=template != CHAT_TEMPLATE)["input_ids"]
    return before_ids, tokenizer(after, add_special_tokens=False)["input_ids"]


def template_token_count(tokenizer: PreTrainedTokenizerBase, template: str | None) -> int:
    """Tokens the template adds around every text (0 without one)."""
    if template is None:
        return 0
    before_ids, after_ids = _template_ids(tokenizer, template)
    return len(before_ids) + len(after_ids)


def room_for_text(tokenizer: PreTrainedTokenizerBase, template: str, max_length: int) -> int:
    """Tokens left for the text under `max_length` once `template` is applied; refuses a template
    the tokenizer cannot apply or one that leaves no room."""
    room = max_length - template_token_count(tokenizer, template)
    if room < 1:
        raise PromptTemplateError(f"max length {max_length} leaves no room for a text: the prompt template "
                                  f"takes {max_length - room} tokens")
    return room


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[object], max_length: int,
                   prompt_template: str | None = None) -> list[list[int]]:
    """Token ids of each input as a classifier reads it: normalised, in its template if it has one,
    at most `max_length` tokens (the text's tail cut, not the template's), unpadded. Inputs may mix
    prompts and `PromptResponse` pairs (`encode_pairs`); prompts encode as they always have."""
    inputs = [normalise_input(text) for text in texts]
    pair_rows = [i for i, value in enumerate(inputs) if isinstance(value, PromptResponse)]
    if pair_rows:
        prompt_rows = [i for i, value in enumerate(inputs) if not isinstance(value, PromptResponse)]
        encoded: list[list[int]] = [[] for _ in inputs]
        for rows, ids in ((pair_rows, encode_pairs(tokenizer, [inputs[i] for i in pair_rows], max_length,
                                                    prompt_template)),
                          (prompt_rows, encode_prompts(tokenizer, [inputs[i] for i in prompt_rows], max_length,
                                                       prompt_template))):
            for row, row_ids in zip(rows, ids):
                encoded[row] = row_ids
        return encoded
    if prompt_template is None:
        return tokenizer(inputs, truncation=True, max_length=max_length)["input_ids"] if inputs else []
    room = room_for_text(tokenizer, prompt_template, max_length)
    before_ids, after_ids = _template_ids(tokenizer, prompt_template)
    if not inputs:
        return []
    text_ids = tokenizer(inputs, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    return [before_ids + ids + after_ids for ids in text_ids]


def response_template_for(prompt_template: str | None) -> str:
    """The pair template that goes with a classifier's prompt template: the chat template's user and
    assistant turns where prompts are read in `chat`, else `RESPONSE_TEMPLATE`."""
    return CHAT_TEMPLATE if prompt_template == CHAT_TEMPLATE else RESPONSE_TEMPLATE


@lru_cache(maxsize=16)
def _pair_template_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids before the prompt, between prompt and response, and after the response."""
    if template == CHAT_TEMPLATE:
        if not getattr(tokenizer, "chat_template", None):
            raise PromptTemplateError(f"prompt template {CHAT_TEMPLATE!r}: this tokenizer has no chat template")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _CHAT_SENTINEL}, {"role": "assistant", "content": _CHAT_RESPONSE_SENTINEL}],
            tokenize=False)
        if rendered.count(_CHAT_SENTINEL) != 1 or rendered.count(_CHAT_RESPONSE_SENTINEL) != 1:
            raise PromptTemplateError(f"prompt template {CHAT_TEMPLATE!r}: the tokenizer's chat template does not "
                                      "place a user's and an assistant's message verbatim")
        before, _, rest = rendered.partition(_CHAT_SENTINEL)
        middle, _, after = rest.partition(_CHAT_RESPONSE_SENTINEL)
        special_tokens = False
    else:
        before, _, rest = template.partition(PROMPT_PLACEHOLDER)
        middle, _, after = rest.partition(RESPONSE_PLACEHOLDER)
        special_tokens = True
    return (tokenizer(before, add_special_tokens=special_tokens)["input_ids"],
            tokenizer(middle, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def pair_lengths(prompt_tokens: int, response_tokens: int, room: int) -> tuple[int, int]:
    """How many tokens of the prompt and of the response fit in `room`: the response's tail is cut
    first, then the prompt's, and a side that needs it keeps at least half of the room."""
    response_kept = min(response_tokens, max(room - prompt_tokens, room // 2))
    return min(prompt_tokens, room - response_kept), response_kept


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptResponse], max_length: int,
                 prompt_template: str | None = None) -> list[list[int]]:
    """Token ids of each (prompt, response) pair in the pair template, at most `max_length` tokens."""
    before_ids, middle_ids, after_ids = _pair_template_ids(tokenizer, response_template_for(prompt_template))
    room = max_length - len(before_ids) - len(middle_ids) - len(after_ids)
    if room < 2:
        raise PromptTemplateError(f"max length {max_length} leaves no room for a prompt and its response: the "
                                  f"response template takes {max_length - room} tokens")
    if not pairs:
        return []
    prompt_ids = tokenizer([pair.prompt for pair in pairs], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([pair.response for pair in pairs], add_special_tokens=False)["input_ids"]
    encoded = []
    for prompt, response in zip(prompt_ids, response_ids):
        prompt_kept, response_kept = pair_lengths(len(prompt), len(response), room)
        encoded.append(before_ids + prompt[:prompt_kept] + middle_ids + response[:response_kept] + after_ids)
    return encoded
