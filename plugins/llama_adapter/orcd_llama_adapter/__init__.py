"""orcd plugin package llama_adapter."""
