"""A tiny prompt dataset with the layout of the ``prompts`` data source (shared by tests)."""

from __future__ import annotations

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
