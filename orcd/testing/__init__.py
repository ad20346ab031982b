"""Test and benchmark support: synthetic GGUF models for every installed architecture and format."""
