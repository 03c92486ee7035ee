"""The hosted moderation API's category keys, filled from the project's S-codes.

Code written against OpenAI's `/v1/moderations` reads `categories["hate"]` or
`category_scores["violence"]`; a classifier here names S1-S12. Each OpenAI key is flagged when any
S-code mapped to it is flagged, and scores the largest of their scores. Keys that no S-code
decides (the `/threatening`, `/intent`, `/instructions` and `/graphic` refinements) are present,
never flagged, with score 0.0, so that such code reads every key it expects.

| OpenAI key | S-codes |
| --- | --- |
| `violence` | S1 Violent Crimes, S8 Indiscriminate Weapons |
| `illicit` | S1, S2 Non-Violent Crimes, S3 Sex-Related Crimes, S4, S7 Intellectual Property, S8 |
| `illicit/violent` | S1, S8 |
| `hate` | S9 Hate |
| `harassment` | S9, S12 Defamation |
| `self-harm` | S10 Suicide & Self-Harm |
| `sexual` | S3, S4 Child Sexual Exploitation, S11 Sexual Content |
| `sexual/minors` | S4 |

S5 (specialized advice) and S6 (privacy) have no key in the hosted API and fill none.
"""

from __future__ import annotations

from collections.abc import Mapping

OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)

S_CODES_OF_OPENAI_CATEGORY: dict[str, tuple[str, ...]] = {
    "violence": ("S1", "S8"),
    "illicit": ("S1", "S2", "S3", "S4", "S7", "S8"),
    "illicit/violent": ("S1", "S8"),
    "hate": ("S9",),
    "harassment": ("S9", "S12"),
    "self-harm": ("S10",),
    "sexual": ("S3", "S4", "S11"),
    "sexual/minors": ("S4",),
}


def openai_category_fields(flags: Mapping[str, bool], scores: Mapping[str, float]) -> tuple[dict, dict]:
    """(categories, category_scores) under the hosted API's keys, from S-code flags and scores."""
    categories, category_scores = {}, {}
    for key in OPENAI_CATEGORIES:
        codes = [code for code in S_CODES_OF_OPENAI_CATEGORY.get(key, ()) if code in scores]
        categories[key] = any(bool(flags.get(code, False)) for code in codes)
        category_scores[key] = max((float(scores[code]) for code in codes), default=0.0)
    return categories, category_scores
