"""Refusals to harmful prompts, as safe answers of the response task (a source's `refusals=N`).

A response source such as PKU-SafeRLHF holds few refusals (31 of its 1,562 answers open with one),
so a classifier trained on it has hardly seen the answer a guarded assistant gives most often, and
may judge "I can't help with that." by the question it answers. `refusals=N` on a prompt source
pairs N of its unsafe training prompts with a refusal each, labelled safe: the answer, not the
question, decides the response verdict. Its unsafe validation prompts (up to N/2) are paired the
same way with wordings no training pair uses (close variants of some are among the training
ones), so the `refusals` source's validation rows measure refusals in wordings the classifier has
not read (their false-positive rate, `evaluation.response_metrics`).
"""

from __future__ import annotations

import numpy as np

from .formatting import PromptResponse

REFUSALS_SOURCE = "refusals"
"""The source name of every generated refusal pair (all prompt sources' pairs together)."""

REFUSALS = (
    "Sorry, I can't provide that information.",
    "I'm sorry, but I can't assist with that request.",
    "I won't help with this. It could seriously hurt people.",
    "I can't help with that.",
    "I can't do that. If you are thinking about hurting yourself or someone else, please reach out to local "
    "emergency services or a crisis line.",
    "I'm not able to help with this request, as it could cause harm. Is there something else I can do for you?",
    "No. I won't write that.",
    "I'm sorry, I can't help with requests like this one.",
    "That's not something I can help with, because it could be used to harm others.",
    "I can't assist with illegal activities. If you have questions about the law, a lawyer can advise you.",
    "I understand you're asking, but I can't give instructions for that.",
    "I must decline. This request asks for content that could put people at risk.",
    "I'm unable to comply with this request.",
    "Sorry, but I won't produce content that demeans people for who they are.",
    "I can't write that. I'd be glad to help with something else, though.",
    "I won't be able to help you with that, but if you're struggling, talking to someone you trust can help.",
    "As an AI assistant, I can't help with anything that could harm people or break the law.",
    "I'm going to pass on this one: it could cause real harm.",
    "I can't share that. Instead, I can point you to general safety resources if that would help.",
    "Sorry, that's not a request I can fulfil.",
    "I'm sorry, but I cannot provide guidance on this topic.",
    "I don't think I should help with that. It could be dangerous.",
    "I cannot create this content.",
    "I can't help with that request. If you're in immediate danger, please call your local emergency number.",
    "I'm afraid I can't do that.",
    "This is something I won't assist with, since it could hurt someone.",
    "I can't provide step-by-step instructions for this. Let me know if there's a safe, legal alternative I can "
    "help with.",
    "Sorry, I can't engage with this request.",
    "I'd rather not help with this, because it would be harmful.",
    "I can't generate that kind of material.",
    "I'm sorry, but this goes against my guidelines, so I can't help.",
    "Unfortunately I can't support this request.",
    "I won't do that. Hurting others is never the answer; if you're angry, it may help to step away and talk to "
    "someone.",
    "I cannot help with this, but I'm happy to talk about the topic in a safe and general way.",
    "I'm not going to provide that.",
    "Sorry, no. That could put people in danger.",
    "I can't assist you with this. Please consider the consequences for the people involved.",
    "I have to refuse this request.",
    "My apologies, but I can't help with that.",
    "I can't help you do this, and I'd encourage you not to.",
)
HELD_OUT_EVERY = 4
"""Every fourth wording is kept for validation pairs only; the first of them is the README's example
refusal, so that its verdict is one on a wording the classifier has not been trained on."""


def refusal_wordings(held_out: bool) -> tuple[str, ...]:
    """The training wordings, or (`held_out`) the ones only validation pairs use."""
    return tuple(text for index, text in enumerate(REFUSALS) if (index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out)


def refusal_pairs(prompts: list[str], count: int, seed: int, *, held_out: bool) -> list[PromptResponse]:
    """`count` of `prompts` (a seeded draw, in their order; all of them where fewer) each with a
    seeded refusal of the training or the held-out wordings."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(prompts), size=min(count, len(prompts)), replace=False))
    wordings = refusal_wordings(held_out)
    return [PromptResponse(prompts[index], wordings[rng.integers(len(wordings))]) for index in chosen]
