"""zerovl: train multimodal LLMs (vision tower + connector + causal LM) on DeepSpeed from one YAML file."""

__version__ = "0.1.0"
