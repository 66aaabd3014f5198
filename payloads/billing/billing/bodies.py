"""What every request body is made of: an allow-list of bounded fields (extra ones refused)."""

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

MAX_AMOUNT = 1_000_000


def storable(text: str) -> str:
    """PostgreSQL text cannot hold NUL, which JSON can carry (as \\u0000): refuse it here, naming the
    field, rather than fail in the database. A validator, so the OpenAPI schema is unchanged.
    (Unpaired surrogates never get this far: pydantic refuses them as strings.)"""
    if "\x00" in text:
        raise ValueError("must not contain the NUL character")
    return text


Key = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$")]
Amount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT)]
Ttl = Annotated[StrictInt, Field(ge=1, le=86_400)]
Description = Annotated[str, Field(max_length=200), AfterValidator(storable)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


