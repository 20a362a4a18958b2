"""The labs' supervised fine-tuning: prompt -> answer rows (some of them text-only), loss on the answer tokens and EOS
only."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

import perturb
from napo.evaluate import answer_batch


def text_only_rows(rows: list[dict[str, Any]], modality: str, fraction: float, seed: int) -> list[dict[str, Any]]:
    """`rows` with the media dropped (`perturb`'s `<modality>.drop`, as the pair generator drops it for the
    language-biased negatives) on round(`fraction` · len(rows)) rows drawn by the replicate `seed` (the lab's
    `text_only_fraction`); their answers stay the row's own, so those text-only rows follow the world's statistics.

    Why: real VLMs also learn from text alone, so without the image they answer what the prior says. An SFT model
    that never saw a prompt without its media answers such a prompt out of distribution ("blue green green green"),
    and its language-biased negatives are then nonsense the policy can push down without touching any real answer.
    With text-only rows the blind model answers the typical colour (or, for objects without one, any colour): the
    negative is the prior's answer, a tie with chosen where the prior is right and a clean pair where the image
    contradicts it — the pairs the paper's language-biased negatives are."""
    count = round(fraction * len(rows))
    if not count:
        return rows
    drop = set(np.random.default_rng([seed, 27]).choice(len(rows), size=count, replace=False).tolist())
    return [perturb.apply(f"{modality}.drop", row) if i in drop else row for i, row in enumerate(rows)]


def supervised_fine_tune(
    folder: Path,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: list[dict[str, Any]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_prefix: str,
    log_every: int,
    progress: bool = True,
) -> None:
    """SFT on prompt -> answer rows (loss on the answer tokens and EOS), then save model and processor to `folder`.

    Rows with and without media (text-only rows) may be mixed: a batch's rows of each kind are encoded and run
    separately (processors refuse a batch where only some texts carry media), and the batch loss is the mean over
    all its answer tokens, as one forward of the whole batch would give.

    AdamW at `lr` with a linear warm-up over 5% of `steps` and a cosine decay to 0; batches of `batch_size` rows
    in a seeded order, reshuffled each epoch; gradients clipped to norm 1. Saved atomically: a killed run leaves
    no half-written folder that would look cached. Progress (unless `progress` is False): a bar with the ETA and the
    loss (renewed every `log_every` steps), labelled `log_prefix`.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=int)
    model.train()
    bar = tqdm(range(steps), desc=f"{log_prefix} SFT", unit="step", mininterval=5, leave=False, disable=not progress)
    for step in bar:
        if len(order) < batch_size:  # a new epoch, reshuffled
            order = np.concatenate([order, rng.permutation(len(rows))])
        batch_idx, order = order[:batch_size], order[batch_size:]
        loss = _batch_loss(model, processor, [rows[i] for i in batch_idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)


def _batch_loss(model: PreTrainedModel, processor: ProcessorMixin, batch: list[dict[str, Any]]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (and EOS) of every row of `batch`; rows with media and rows without
    run as separate forwards, each group's token-mean loss weighted by its share of the batch's answer tokens."""
    groups: dict[bool, list[dict[str, Any]]] = {}
    for row in batch:
        groups.setdefault(bool(row.get("images") or row.get("audios")), []).append(row)
    losses, counts = [], []
    for group in groups.values():
        inputs, answer_mask = answer_batch(processor, group, [r["answer"] for r in group])
        counts.append(int(answer_mask.sum()))
        losses.append(model(**inputs, labels=inputs["input_ids"].masked_fill(answer_mask == 0, -100)).loss)
    total = sum(counts)
    return sum(loss * (count / total) for loss, count in zip(losses, counts))
