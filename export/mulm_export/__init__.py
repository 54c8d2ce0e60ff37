"""mulm-export: checkpoints → mulmd model directories (model.onnx, tokenizer.json, mulm.json)."""

__version__ = "0.1.0"
