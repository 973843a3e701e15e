"""RNN-family text classifiers and language models: data, tokenizers, models, training."""
