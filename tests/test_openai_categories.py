"""The hosted moderation API's category keys, filled from S-codes."""

from __future__ import annotations

from safety_classifier.openai_categories import OPENAI_CATEGORIES, S_CODES_OF_OPENAI_CATEGORY, openai_category_fields

CODES = [f"S{i}" for i in range(1, 13)]


def test_every_hosted_key_is_present_and_only_mapped_codes_flag_it():
    flags = {code: code in ("S9", "S10") for code in CODES}
    scores = {code: 0.9 if flags[code] else 0.1 for code in CODES}
    scores["S12"] = 0.3
    categories, category_scores = openai_category_fields(flags, scores)
    assert list(categories) == list(OPENAI_CATEGORIES) == list(category_scores)
    assert {key for key, on in categories.items() if on} == {"hate", "harassment", "self-harm"}
    assert category_scores["harassment"] == 0.9  # the largest of S9's and S12's
    assert category_scores["violence"] == 0.1
    assert category_scores["hate/threatening"] == 0.0 and not categories["hate/threatening"]


def test_a_classifier_without_some_codes_fills_their_keys_with_nothing():
    categories, category_scores = openai_category_fields({"S9": True}, {"S9": 0.8})
    assert categories["hate"] and category_scores["hate"] == 0.8
    assert not categories["violence"] and category_scores["violence"] == 0.0


def test_every_mapped_code_is_a_project_code_and_every_mapped_key_a_hosted_one():
    assert set(S_CODES_OF_OPENAI_CATEGORY) <= set(OPENAI_CATEGORIES)
    assert {code for codes in S_CODES_OF_OPENAI_CATEGORY.values() for code in codes} <= set(CODES)
