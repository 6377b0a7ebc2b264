"""The toy pretraining lab: corpora, a word-level tokenizer and a small Llama trained on them.

It produces the bundled ``toy-base`` / ``toy-code`` / ``toy-control`` checkpoints, saved in Hugging
Face format so they load through :func:`boxprobe.models.load_model` like any hub checkpoint.
"""
