"""A tiny prompt dataset with the layout of the ``prompts`` data source (shared by tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mentor.generation import left_pad

PAD = 0


class Prompts(Dataset):
    """Prompts of 2-5 tokens with a 3-token reference completion (the layout of data 'prompts')."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            p = torch.randint(3, 120, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            c = torch.randint(3, 120, (3,), generator=g)
            self.items.append({"index": i, "prompt": p.tolist(), "completion": c.tolist()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict]) -> dict:
    """Left-padded prompts, right-padded completions; only completion tokens count."""
    ids, mask = left_pad([it["prompt"] for it in items], PAD)
    comp = torch.tensor([it["completion"] for it in items])
    ones = torch.ones_like(comp)
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "prompt_ids": ids,
        "prompt_mask": mask,
        "input_ids": torch.cat([ids, comp], 1),
        "attention_mask": torch.cat([mask, ones], 1),
        "completion_mask": torch.cat([torch.zeros_like(mask), ones], 1),
    }


# ----------------------------------------------------------------------------- saved tiny models

W_PAD, W_UNK, W_EOS = 0, 1, 2
N_WORDS = 40


def word_tokenizer():
    """A whitespace word-level tokenizer (``w<i>`` is id ``i + 3``), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": W_PAD, "[UNK]": W_UNK, "</s>": W_EOS}
    vocab.update({f"w{i}": i + 3 for i in range(N_WORDS)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )


def save_tiny_llama(folder: Path, seed: int = 0, extra_vocab: int = 0) -> Path:
    """Save a random 2-layer Llama and its word-level tokenizer in ``folder`` (a teacher);
    ``extra_vocab`` output rows more than the tokenizer has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok) + extra_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=W_EOS, pad_token_id=W_PAD, bos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_word_prompts(path: Path, n: int = 10, seed: int = 3) -> Path:
    """A JSONL of ``n`` prompts of 2-5 random words with a two-word reference completion."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        words = torch.randint(0, N_WORDS, (k,), generator=g).tolist()
        rows.append({"prompt": " ".join(f"w{i}" for i in words), "completion": "w1 w2"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
