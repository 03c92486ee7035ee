"""A conversation sent to `/v1/moderations`: its last message judged in the context of the ones before.

The service's extension of the OpenAI request: `input` may be one conversation, a list of
`{"role": "user" | "assistant" | "system", "content": str}` messages (checked in `protocol`).
Its last message is the one judged:

- the assistant's: a `PromptResponse` whose response is that message and whose prompt is what it
  answers, the user's message before it alone, or, where more turns came before, each earlier turn
  as a `role: content` line;
- the user's: a prompt, that message alone, or after the earlier turns' `role: content` lines
  as `user: content`.

System messages are accepted and left out: they are the operator's instructions to the model,
neither something a user asked nor an answer. Where the whole conversation does not fit the
classifier's max length, the oldest earlier turns are dropped until it does, so that a long
history cannot push the judged message, or the message it answers, out of what the model reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from ..formatting import ModerationInput, PromptResponse, encode_prompts

ROLES = ("user", "assistant", "system")


class Message(NamedTuple):
    role: str
    content: str


class Conversation(NamedTuple):
    """Checked messages (`protocol`); the last one is the user's or the assistant's."""

    messages: tuple[Message, ...]

    @property
    def turns(self) -> list[Message]:
        """The user's and the assistant's messages, in order: what is judged and its context."""
        return [message for message in self.messages if message.role != "system"]

    @property
    def least_context(self) -> int:
        """Earlier turns always kept: an answer keeps the message it answers, a prompt needs none."""
        return 1 if self.messages[-1].role == "assistant" and len(self.turns) > 1 else 0

    def judged_input(self, context: int | None = None) -> ModerationInput:
        """The input a classifier scores: the last turn, after the `context` most recent earlier ones
        (None: all of them)."""
        *earlier, last = self.turns
        kept = earlier if context is None else earlier[len(earlier) - context:] if context else []
        lines = [f"{turn.role}: {turn.content}" for turn in kept]
        if last.role == "assistant":
            prompt = kept[0].content if len(kept) == 1 and kept[0].role == "user" else "\n".join(lines)
            return PromptResponse(prompt, last.content)
        return "\n".join([*lines, f"user: {last.content}"]) if kept else last.content


def fits(tokenizer: PreTrainedTokenizerBase, value: ModerationInput, max_length: int,
         prompt_template: str | None) -> bool:
    """Whether `value` is read whole within `max_length` tokens: encoded with room for one token
    more, it takes that token only if it would have been cut."""
    return len(encode_prompts(tokenizer, [value], max_length + 1, prompt_template)[0]) <= max_length


def fitted_input(conversation: Conversation, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 prompt_template: str | None) -> ModerationInput:
    """`conversation.judged_input` with as many of the most recent earlier turns as fit `max_length`."""
    earlier = len(conversation.turns) - 1
    least = conversation.least_context
    if earlier <= least:
        return conversation.judged_input()
    # Counted once, line by line, so that a long history is tokenized once; the candidate is then checked whole.
    droppable = conversation.turns[:earlier - least]
    line_tokens = tokenizer([f"{turn.role}: {turn.content}\n" for turn in droppable],
                            add_special_tokens=False)["input_ids"]
    room = max_length - len(encode_prompts(tokenizer, [conversation.judged_input(least)], max_length,
                                           prompt_template)[0])
    context = least
    for ids in reversed(line_tokens):
        if len(ids) > room:
            break
        room -= len(ids)
        context += 1
    while context > least and not fits(tokenizer, conversation.judged_input(context), max_length, prompt_template):
        context -= 1
    return conversation.judged_input(context)


def resolve_inputs(values: Sequence[object], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   prompt_template: str | None) -> list[ModerationInput]:
    """Each conversation as the input it is judged as (`fitted_input`); other inputs as they are."""
    return [fitted_input(value, tokenizer, max_length, prompt_template) if isinstance(value, Conversation) else value
            for value in values]
