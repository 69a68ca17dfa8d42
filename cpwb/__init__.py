"""cpwb: the Contrastive Perplexity Workbench (detoxifying language models with contrastive perplexity).

Offline by default: the Hugging Face hub is never contacted unless CPWB_ONLINE=1 is set (it must be decided
before transformers is imported, hence here).
"""
import os

if os.environ.get("CPWB_ONLINE") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
