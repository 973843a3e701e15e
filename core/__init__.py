"""The torch-free core every part shares: tokenizers and the vocabulary (tokenize.py), the one
rule from text to graph input and back (codec.py), and the model repository contract
(repository.py). It imports nothing from models/, export/, serving/ or loadtest/."""
