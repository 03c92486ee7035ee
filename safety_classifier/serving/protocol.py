"""The OpenAI moderation API's request, response and error bodies, as pydantic models.

A request that does not fit is refused with the status and message the hosted API's clients
can act on: the validators raise errors whose type is the OpenAI error `code`, and
`parse_moderation_request` turns the first one into an `ApiError`.

Two extensions: `input` may be one conversation, a list of `{"role", "content"}` messages whose
last message is judged (`conversation`), and each result says which text it judged (`judged`).
Results carry the hosted API's category keys (`openai_categories`) beside the classifier's own.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..formatting import normalise_prompt
from ..openai_categories import openai_category_fields
from .conversation import ROLES, Conversation, Message

BINARY_CATEGORY = "unsafe"
STATUS_OF_CODE = {"too_many_inputs": 413}  # every other refused body is a 422


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, as error messages name it."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _refusal(code: str, message: str, param: str | None, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(code, message, {"param": param, **context})


def is_message(item: object) -> bool:
    """An item of `input` that is meant as a conversation's message rather than a text."""
    return isinstance(item, dict) and ("role" in item or "content" in item)


def parse_conversation(items: list) -> Conversation:
    """The messages of a conversation, each checked, or the refusal naming the first bad one."""
    messages = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not is_message(item):
            kind = "a text part" if isinstance(item, dict) else {"array": "an array"}.get(json_type(item),
                                                                                        f"a {json_type(item)}")
            raise _refusal("mixed_input", f"'{where}' is {{kind}}, but 'input' holds messages: send texts, or one "
                           "conversation of messages with a role and a content, not both", where, kind=kind)
        if "role" not in item:
            raise _refusal("missing_field", f"'{where}' has no 'role' (user, assistant or system)", f"{where}.role")
        if item["role"] not in ROLES:
            raise _refusal("invalid_value", f"'{where}.role' must be user, assistant or system, not {{role}}",
                           f"{where}.role", role=json.dumps(item["role"])[:60])
        if "content" not in item:
            raise _refusal("missing_field", f"'{where}' has no 'content' (a string)", f"{where}.content")
        if not isinstance(item["content"], str):
            raise _refusal("invalid_type", f"'{where}.content' must be a string (text only), not {{kind}}",
                           f"{where}.content", kind=json_type(item["content"]))
        messages.append(Message(item["role"], normalise_prompt(item["content"])))
    if messages[-1].role == "system":
        raise _refusal("invalid_value", "the last message is the one judged: it must be the user's or the "
                       "assistant's, not the system's", f"input[{len(messages) - 1}].role")
    return Conversation(tuple(messages))


class ModerationRequest(BaseModel):
    """`{"input": str | [str | {"type": "text", "text": str}] | [{"role", "content"}], "model"?: str}`;
    validated, `input` is the list of texts, or one `Conversation`. Other fields are ignored, as the
    hosted API's clients may send them."""

    model_config = ConfigDict(extra="ignore")

    # `model` comes first: fields are validated in order, and a bad model is reported before a bad input.
    model: str | None = None
    input: list[str | Conversation]

    @model_validator(mode="before")
    @classmethod
    def _an_object_with_input(cls, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise _refusal("invalid_type", "the request body must be a JSON object, not {kind}", None,
                           kind=json_type(payload))
        if "input" not in payload:
            raise _refusal("missing_input", "'input' is required: a string or an array of strings", "input")
        return payload

    @field_validator("model", mode="before")
    @classmethod
    def _model_is_a_string(cls, model: Any) -> Any:
        if model is not None and not isinstance(model, str):
            raise _refusal("invalid_type", "'model' must be a string, not {kind}", "model", kind=json_type(model))
        return model

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, items: Any, info: ValidationInfo) -> list[str] | list[Conversation]:
        if isinstance(items, str):
            return [items]
        if not isinstance(items, list):
            raise _refusal("invalid_type", "'input' must be a string or an array of strings, not {kind}", "input",
                           kind=json_type(items))
        if not items:
            raise _refusal("empty_input", "'input' is an empty array: give at least one text", "input")
        if any(is_message(item) for item in items):  # one conversation: one input, however many messages
            return [parse_conversation(items)]
        max_inputs = (info.context or {}).get("max_inputs")
        if max_inputs is not None and len(items) > max_inputs:
            raise _refusal("too_many_inputs", "'input' has {count} texts; at most {max_inputs} are accepted in one "
                           "request", "input", count=len(items), max_inputs=max_inputs)
        texts = []
        for index, item in enumerate(items):
            if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                item = item["text"]  # the multi-modal form's text part
            if not isinstance(item, str):
                kind = f"an {item.get('type')!r:.60} part" if isinstance(item, dict) and "type" in item else json_type(item)
                raise _refusal("invalid_type", "'input[{index}]' must be a string (text only), not {kind}",
                               f"input[{index}]", index=index, kind=kind)
            texts.append(item)
        return texts


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    judged: Literal["prompt", "response"] = "prompt"
    """Which text the verdict is about: a prompt, or an answer (a conversation's last message, the assistant's)."""

    @classmethod
    def from_verdict(cls, verdict: dict, judged: str = "prompt") -> ModerationResult:
        """The result of one `Classifier.verdict`: `flagged` is the classifier's own decision; the
        categories are the classifier's (for a binary one, just "unsafe"), then the hosted API's
        keys filled from them (`openai_category_fields`; a binary classifier's all unflagged, 0.0).
        A classifier's own code that is also a hosted key keeps the classifier's value."""
        flagged = verdict["label"] == "unsafe"
        own_flags = verdict.get("categories", {BINARY_CATEGORY: flagged})
        own_scores = verdict.get("category_scores", {BINARY_CATEGORY: verdict["unsafe_probability"]})
        hosted_flags, hosted_scores = openai_category_fields(verdict.get("categories", {}),
                                                             verdict.get("category_scores", {}))
        # The classifier's own keys first, as before the hosted ones were added.
        flags = {**own_flags, **{key: value for key, value in hosted_flags.items() if key not in own_flags}}
        scores = {**own_scores, **{key: value for key, value in hosted_scores.items() if key not in own_scores}}
        return cls(flagged=flagged, categories=flags, category_scores=scores,
                   category_applied_input_types={name: ["text"] for name in flags}, judged=judged)


class ModerationResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"modr-{uuid.uuid4().hex}")
    model: str
    results: list[ModerationResult]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


class ApiError(Exception):
    """An error to answer with its HTTP status and an `ErrorResponse`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type, param=self.param,
                                             code=self.code))


def parse_moderation_request(body: bytes, max_inputs: int) -> ModerationRequest:
    """The validated request, or the ApiError (400, 413, 422) saying what is wrong with it."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    try:
        return ModerationRequest.model_validate(payload, context={"max_inputs": max_inputs})
    except ValidationError as refused:
        first = refused.errors(include_url=False)[0]
        context = first.get("ctx") or {}
        param = context["param"] if "param" in context else ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(STATUS_OF_CODE.get(first["type"], 422), first["msg"], param=param, code=first["type"]) from None
