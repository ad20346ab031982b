"""orcd plugin package gpt_adapter: the GPT-OSS architecture (``gpt_oss``), its mixture of experts (``moe``) and
YaRN as the model was trained with it (``yarn``)."""
