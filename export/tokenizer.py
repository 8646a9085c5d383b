"""The GPT-2 byte-level BPE tokenizer, built from the files vendored in export/data/gpt2-bpe/.

Used for random-init presets (whose "checkpoint" has no tokenizer of its own) and to give
transformers a tokenizer when it saves one (the yardstick training script).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BPE_DIR = Path(__file__).parent / "data" / "gpt2-bpe"
EOS = "<|endoftext|>"


def build_gpt2_tokenizer() -> Tokenizer:
    """A `tokenizers.Tokenizer` identical to GPT-2's (checked: "Paris will" -> [40313, 481])."""
    vocab, merges = models.BPE.read_file(str(BPE_DIR / "vocab.json"), str(BPE_DIR / "merges.txt"))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return tok


def save_tokenizer_files(out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json and the transformers side files (vocab, merges, config).

    model_max_length: the model's n_positions (transformers reads it from tokenizer_config)."""
    import json
    import shutil

    build_gpt2_tokenizer().save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(BPE_DIR / "vocab.json", out_dir / "vocab.json")
    shutil.copyfile(BPE_DIR / "merges.txt", out_dir / "merges.txt")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": EOS, "eos_token": EOS,
        "unk_token": EOS, "model_max_length": model_max_length, "add_prefix_space": False,
    }, indent=2))
