"""How a text becomes the token ids a classifier reads: the one place prompts are formatted and encoded.

A classifier reads the text as it is (the default), or wrapped in a prompt template stored with it
(`--prompt-template`, `safety_classifier.json`'s `prompt_template`):

- `chat`: the tokenizer's own chat template, the text as the user's turn, followed by the start
  of the assistant's turn (`add_generation_prompt`), so the head reads the hidden state the model
  would answer from;
- any string with one `{text}` in it, such as `"User prompt: {text}\\nSafe or unsafe?"`.

Over-long texts lose their own tail, never the template's: the head reads the last token, which
with a template is the template's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from .errors import PromptTemplateError

CHAT_TEMPLATE = "chat"
TEXT_PLACEHOLDER = "{text}"
_CHAT_SENTINEL = "SAFETYCLASSIFIERTEXTSLOT"


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
    """Token ids of each text as a classifier reads it: normalised, in its template if it has one,
    at most `max_length` tokens (the text's tail cut, not the template's), unpadded."""
    prompts = [normalise_prompt(text) for text in texts]
    if prompt_template is None:
        return tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
    room = room_for_text(tokenizer, prompt_template, max_length)
    before_ids, after_ids = _template_ids(tokenizer, prompt_template)
    if not prompts:
        return []
    text_ids = tokenizer(prompts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    return [before_ids + ids + after_ids for ids in text_ids]
