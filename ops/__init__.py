"""Operator tools: `python -m ops status <stack>` (README "Operating the bridge")."""
