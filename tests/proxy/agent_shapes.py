"""The structured answer the CIRIS agent asks for, shaped like its action selection (an enum, text,
a number, nested models). Pydantic only: the agent's venv imports it too (agent_llm_driver.py)."""

from typing import List, Literal, Optional

from pydantic import BaseModel, Field


class Step(BaseModel):
    reason: str = Field(min_length=1)
    weight: int = Field(ge=1)


class Decision(BaseModel):
    selected_action: Literal["speak", "ponder", "defer"]
    rationale: str
    confidence: float = Field(ge=0, le=1)
    steps: List[Step] = Field(min_length=1)
    note: Optional[str] = None
