"""The HTTP routes, one module per API: KServe V1 (v1.py), Open Inference Protocol V2 (v2.py),
language models (lm.py), model control (control.py)."""
