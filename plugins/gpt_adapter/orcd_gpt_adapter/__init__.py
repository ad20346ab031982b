"""orcd plugin package gpt_adapter."""
