"""A word-level tokenizer shared by every toy checkpoint, built locally with ``tokenizers``."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from boxprobe.task import load_vocabulary

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Words of the boxes task in both phrasings, the prompt templates, and the code corpus.
TASK_WORDS = """Box Container contains nothing the and Move from to Remove Put into Pick up in place it them
Take out of Place inside there is are empty Description Statement now""".split()
CODE_WORDS = """boxes append remove pop extend clear add discard print sorted list set len x for if not
True False None""".split()
PUNCTUATION = tuple(". , : ; ' \" ( ) [ ] { } = + - * / # _ ! ?".split()) + ("\n",)
# Splits on spaces, then isolates newlines, words and single punctuation marks.
PRE_TOKENIZER_PATTERN = r"\n|\w+|[^\w\s]"


def toy_words() -> list[str]:
    """Every word of the toy vocabulary, in a fixed order (so token ids never depend on a hash)."""
    words = list(SPECIAL_TOKENS) + TASK_WORDS + CODE_WORDS + list(PUNCTUATION)
    words += [str(d) for d in range(10)] + list(string.ascii_uppercase) + list(string.ascii_lowercase)
    words += list(load_vocabulary("objects")) + list(load_vocabulary("objects_rare"))
    return list(dict.fromkeys(words))  # de-duplicate, keeping the first position


def build_tokenizer(name_or_path: str = "boxprobe-toy") -> PreTrainedTokenizerFast:
    """The toy tokenizer: word level, BOS prepended, left padding for batched evaluation."""
    vocab = {w: i for i, w in enumerate(toy_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", name_or_path=name_or_path, add_bos_token=True)
    return fast


def save_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(str(directory))
    tok.save_pretrained(directory)
    return tok
