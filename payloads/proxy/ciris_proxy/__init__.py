"""CIRIS proxy: LiteLLM's OpenAI-compatible proxy with billing's tokens and credit holds around
every paid call (FSD §4.3)."""
