"""Tiny randomly initialised transformers for the ``hf`` extra's tests, built offline: a
tokenizer trained on the test's own text and a model from a config (no download)."""

from __future__ import annotations

from pathlib import Path

PROSE = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is "
    "let at last?",
    "Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just been "
    "here, and she told me all about it.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence.",
]


def write_texts(directory: Path, n_docs: int = 12) -> Path:
    """A .txt file of ``n_docs`` paragraphs of prose, some long enough to need two contexts."""
    paragraphs = [" ".join(PROSE[(i + j) % len(PROSE)] for j in range(1 + i % 3)) for i in range(n_docs)]
    path = directory / "prose.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def tiny_bert(directory: Path) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer adding [CLS] and [SEP]."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(PROSE, trainers.WordPieceTrainer(vocab_size=160, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id, architectures=["BertModel"])
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_gpt2(directory: Path) -> Path:
    """A 2-layer GPT-2 LM (hidden 32) with a byte-level BPE tokenizer (no special tokens)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROSE, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        architectures=["GPT2LMHeadModel"])
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
