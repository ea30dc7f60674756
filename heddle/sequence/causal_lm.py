"""A sequence-parallel causal-LM batch: this rank's shard, global positions, globally shifted labels.

Under SP the target of the last token of rank r's shard is the first token of rank r+1's shard, so
shifting labels after sharding (what HF's ``loss_function`` does by default) loses one target per
shard and mislabels nothing only by luck. :func:`shard_for_causal_lm` shifts the labels of the whole
sequence first (``labels[i] = tokens[i + 1]``), never across a document boundary of a packed row
(a position that does not continue the previous one starts a document, HF's rule), pads the sequence
to a multiple of P (``ignore_index`` labels, padding mask 0, positions that keep counting) and cuts
every tensor into the P shards of :func:`~heddle.sequence.shard_sequence`.

With ``N = num_tokens`` the count of real labels in the whole batch:
``sum over ranks of (local token-sum loss) / N`` is exactly the full-sequence token-mean loss, so

- with HF's loss: ``model(**batch.hf_inputs()).loss`` is ``local_sum / N`` (``shift_labels`` and
  ``num_items_in_batch`` are set); the gradients summed over the SP group are the full gradient;
- with the Trainer: ``trainer.backward(local_sum, num_tokens=batch.local_tokens)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heddle.sequence.sharding import SequenceShard, shard_sequence


@dataclass
class CausalLMShard:
    """One rank's share of a causal-LM batch (every tensor ``[b, s_pad/P]``)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor       # global positions (RoPE)
    labels: torch.Tensor             # already shifted: the target of each position, or ignore_index
    attention_mask: torch.Tensor | None
    num_tokens: int                  # real labels in the whole batch (every rank): the loss divisor
    local_tokens: int                # real labels in this shard
    shard: SequenceShard

    def hf_inputs(self) -> dict:
        """Keyword arguments for a transformers causal LM: its loss is then ``local_sum / num_tokens``."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels,
               "shift_labels": self.labels, "num_items_in_batch": self.num_tokens, "use_cache": False}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out


def shift_causal_labels(labels: torch.Tensor, position_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels [b, s], position_ids [b, s] -> targets [b, s]: ``labels[:, i + 1]``, ``ignore_index`` at
    the last position and where position i + 1 starts a new document."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    shifted[:, :-1] = shifted[:, :-1].masked_fill(starts, ignore_index)
    return shifted


def _check_2d(name: str, t, shape) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or (shape is not None and tuple(t.shape) != shape):
        want = "[b, s]" if shape is None else f"{list(shape)}"
        raise ValueError(f"{name} must be a {want} tensor, got {getattr(t, 'shape', type(t).__name__)}")


def shard_for_causal_lm(input_ids: torch.Tensor, group=None, *, labels: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        ignore_index: int = -100) -> CausalLMShard:
    """input_ids [b, s] (the whole sequence, identical on every rank of ``group``) -> this rank's
    :class:`CausalLMShard`.

    ``labels`` [b, s] (default: ``input_ids``, with ``ignore_index`` where ``attention_mask`` is 0) are
    the unshifted targets HF takes; ``position_ids`` [s] or [b, s] (default ``arange(s)``) mark packed
    documents by their resets; ``attention_mask`` [b, s] is a padding mask (1 = real token).
    """
    _check_2d("input_ids", input_ids, None)
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must hold token ids (an integer tensor), got dtype {input_ids.dtype}")
    b, s = input_ids.shape
    if attention_mask is not None:
        _check_2d("attention_mask", attention_mask, (b, s))
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    _check_2d("labels", labels, (b, s))
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} must be [s] or [b, s] with s={s}, b={b}")
    position_ids = position_ids.expand(b, s)
    targets = shift_causal_labels(labels, position_ids, ignore_index)
    num_tokens = int((targets != ignore_index).sum())
    local_ids, shard = shard_sequence(input_ids, group, 1, pad_value=0)
    local_targets, _ = shard_sequence(targets, group, 1, pad_value=ignore_index)
    steps = torch.arange(1, shard.padding + 1, device=position_ids.device).expand(b, -1)
    padded_pos = torch.cat([position_ids, position_ids[:, -1:] + steps], 1)  # padding keeps counting
    local_pos = padded_pos.narrow(1, shard.start, shard.local_length)
    local_mask = None
    if attention_mask is not None:
        local_mask, _ = shard_sequence(attention_mask, group, 1, pad_value=0)
    # contiguous: narrow() views of [b, s] rows are strided, and HF's loss calls .view(-1) on them
    local_ids, local_pos, local_targets = local_ids.contiguous(), local_pos.contiguous(), local_targets.contiguous()
    local_mask = None if local_mask is None else local_mask.contiguous()
    return CausalLMShard(input_ids=local_ids, position_ids=local_pos, labels=local_targets,
                         attention_mask=local_mask, num_tokens=num_tokens,
                         local_tokens=int((local_targets != ignore_index).sum()), shard=shard)
