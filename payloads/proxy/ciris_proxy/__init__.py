"""CIRIS proxy: an OpenAI-compatible front with a strict request contract, billing's tokens and a
credit hold around every paid call, calling providers through LiteLLM as a library (FSD §4.3, ADR 8)."""
