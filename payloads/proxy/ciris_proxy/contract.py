"""The request contract: the OpenAI chat-completions parameters the proxy accepts, as strict pydantic
models. Anything else is a 400 naming the field (never its value); nothing a client sends reaches
LiteLLM or a provider unless it is named here. Provider routing, keys, base URLs, deployment ids,
fallbacks and `extra_body` are never among them. `metadata` is taken only in the shape the CIRIS agent
sends it (its interaction id and retry fields) and is ours: kept for billing, never forwarded.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

Text = Annotated[str, Field(max_length=10_000_000)]
Name = Annotated[str, Field(min_length=1, max_length=128)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def data_only(cls, url: str) -> str:
        if not url.startswith("data:image/"):  # never a URL the provider (or LiteLLM) would fetch
            raise ValueError("images are accepted only inline, as data:image/... URLs")
        return url


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


def _tag(field: str):
    def tag(v: Any) -> str:
        return f"{field}={v.get(field) if isinstance(v, dict) else getattr(v, field, None)}"
    return tag


Part = Annotated[Union[Annotated[TextPart, Tag("type=text")], Annotated[ImagePart, Tag("type=image_url")]],
                 Discriminator(_tag("type"))]


class FunctionCall(Strict):
    name: Name
    arguments: Text


class ToolCall(Strict):
    id: Name
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(Strict):
    role: Literal["system"]
    content: Text | list[TextPart]
    name: Name | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Text | list[Part]
    name: Name | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Text | list[TextPart] | None = None
    name: Name | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Text | list[TextPart]
    tool_call_id: Name
    name: Name | None = None  # the function's name: instructor's TOOLS-mode retry sends it


Message = Annotated[Union[Annotated[SystemMessage, Tag("role=system")], Annotated[UserMessage, Tag("role=user")],
                          Annotated[AssistantMessage, Tag("role=assistant")], Annotated[ToolMessage, Tag("role=tool")]],
                    Discriminator(_tag("role"))]


class Function(Strict):
    name: Name
    description: Annotated[str, Field(max_length=100_000)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(Strict):
    name: Name


class ToolChoiceFunction(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(Strict):
    name: Name
    description: Annotated[str, Field(max_length=100_000)] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(Strict):
    include_usage: bool | None = None


Number = Annotated[float, Field(allow_inf_nan=False)]
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class Metadata(Strict):
    """What the CIRIS agent sends to a CIRIS proxy (its `LLMRequestMetadata`; unset fields as null):
    one id for every LLM call of an agent interaction, and its retry bookkeeping. For billing only."""
    interaction_id: Id
    retry_count: Annotated[int, Field(ge=0, le=1000)] | None = None
    previous_error: Annotated[str, Field(max_length=256)] | None = None  # an error category, e.g. TIMEOUT
    original_request_id: Id | None = None


class ChatRequest(Strict):
    model: Annotated[str, Field(min_length=1, max_length=128)]
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Annotated[str, Field(max_length=1000)] | Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # accepted for compatibility, not forwarded
    metadata: Metadata | None = None  # ours (billing), not forwarded

    def has_images(self) -> bool:
        return any(isinstance(m, UserMessage) and isinstance(m.content, list)
                   and any(isinstance(p, ImagePart) for p in m.content) for m in self.messages)

    def upstream_params(self) -> dict[str, Any]:
        """What goes to LiteLLM: the parameters the client set, minus model, stream, user and metadata (ours)."""
        return self.model_dump(exclude_unset=True, exclude={"model", "stream", "user", "metadata"}, by_alias=True)


class ContractError(ValueError):
    """A request outside the contract: status, a message naming the field, and that field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


# Field names as a client writes them; anything else in a pydantic error location (a union member's
# name, a discriminator tag) is pydantic's bookkeeping, not part of the client's path.
_FIELDS = frozenset(
    (f.alias or name) for model in (Strict, *Strict.__subclasses__()) for name, f in model.model_fields.items())


def _param(loc: tuple) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _FIELDS:
            out += f".{item}" if out else item
    return out


def parse(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        # The deepest error is the one that says what is wrong (a union reports each member's; among
        # equals, a bound broken says more than a type that did not fit, and an unknown field most).
        err = max(errors, key=lambda x: (len(x["loc"]), not x["type"].endswith("_type"), x["type"] == "extra_forbidden"))
        param, kind = _param(err["loc"]), err["type"]
        if kind == "json_invalid" or (kind in ("model_type", "model_attributes_type") and not param):
            raise ContractError("the request body must be a JSON object (OpenAI's chat-completions request)") from None
        if kind == "extra_forbidden":  # the unknown field's own name, once (it may share a known field's)
            name, parent = str(err["loc"][-1])[:64], _param(err["loc"][:-1])
            param = f"{parent}.{name}" if parent else name
            raise ContractError(f"unrecognized request argument: {param}", param, code="unknown_parameter") from None
        if kind == "missing":
            raise ContractError(f"missing required parameter: {param}", param, code="missing_parameter") from None
        if kind == "union_tag_invalid":  # a role or part type we do not take; its message would quote it
            pairs = re.findall(r"'(\w+)=(\w+)'", err["ctx"]["expected_tags"])
            param = f"{param}.{pairs[0][0]}"
            raise ContractError(f"invalid value for {param}: must be one of {', '.join(t for _, t in pairs)}",
                                param, code="invalid_value") from None
        message = err["msg"].removeprefix("Value error, ")
        raise ContractError(f"invalid value for {param}: {message}", param, code="invalid_value") from None
