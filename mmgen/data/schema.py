"""Batch schema: what every token carries, and how examples become packed rows.

Per token, all int32 [B, L] except loss_weight (float32):
  tokens       token id in the one vocabulary (tokenizers/layout.py)
  segment_ids  which example of the packed row (1, 2, ...); 0 = padding
  positions    1D position inside its example (RoPE)
  rows, cols   grid coordinates of image tokens (0 for everything else; 2D RoPE)
  modality     modality id (tokenizers/layout.MODALITIES); 0 for padding
  span_ids     > 0 marks a bidirectional span (a prompt image); 0 = causal
  loss_weight  weight of predicting this token from the tokens before it

A bidirectional span never carries loss: inside it a token sees its successor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmgen.tokenizers.layout import MODALITIES, TokenLayout

# The caption of unconditional examples (caption dropout) and of classifier-free
# guidance's unconditional branch: one fixed null caption used identically by both.
NULL_CAPTION = ""

FIELDS = ("tokens", "segment_ids", "positions", "rows", "cols", "modality", "span_ids",
          "loss_weight")


class Stream:
    """Builds one example's token stream piece by piece."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.cols: dict[str, list] = {f: [] for f in FIELDS if f != "segment_ids"}
        self._next_span = 1

    def _add(self, tokens, modality: str, loss: float, rows=None, cols=None, span: int = 0):
        n = len(tokens)
        start = len(self.cols["tokens"])
        self.cols["tokens"] += [int(t) for t in tokens]
        self.cols["positions"] += list(range(start, start + n))
        self.cols["rows"] += list(rows) if rows is not None else [0] * n
        self.cols["cols"] += list(cols) if cols is not None else [0] * n
        self.cols["modality"] += [MODALITIES[modality]] * n
        self.cols["span_ids"] += [span] * n
        self.cols["loss_weight"] += [0.0 if span else loss] * n

    def text(self, ids: Sequence[int], loss: bool = True) -> Stream:
        self._add(ids, "text", float(loss))
        return self

    def special(self, name: str, modality: str = "text", loss: bool = True) -> Stream:
        self._add([self.layout.special(name)], modality, float(loss))
        return self

    def image(self, image_ids: Sequence[int], *, generate: bool) -> Stream:
        """`<boi> <res> ids <eoi>`: a generation target (causal, with loss) or a prompt
        image (one bidirectional span, no loss). 2D ids [rows, cols] carry their own grid
        (aspect-ratio buckets); flat ids use the layout's."""
        ids = np.asarray(image_ids)
        h, w = ids.shape if ids.ndim == 2 else self.layout.image_grid
        ids = ids.reshape(-1)
        if ids.size != h * w:
            raise ValueError(f"image has {ids.size} tokens, layout expects {h}x{w}")
        self.special("<boi>", "text", loss=generate)
        self.special("<res>", "image", loss=generate)
        span = 0
        if not generate:
            span, self._next_span = self._next_span, self._next_span + 1
        grid_r, grid_c = np.divmod(np.arange(h * w), w)
        self._add(ids + self.layout.image_offset, "image", float(generate),
                  rows=grid_r + 1, cols=grid_c + 1, span=span)
        self.special("<eoi>", "image", loss=generate)
        return self

    def __len__(self) -> int:
        return len(self.cols["tokens"])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v, np.float32 if k == "loss_weight" else np.int32)
               for k, v in self.cols.items()}
        if len(out["loss_weight"]):
            out["loss_weight"][0] = 0.0  # the first token has no context to be predicted from
        return out


def pair_stream(layout: TokenLayout, text_ids, image_ids, captioning: bool) -> dict:
    """One image+caption example: `<bos> text <boi> <res> ids <eoi> <eos>` (text->image),
    or with `captioning` the image first as a bidirectional prompt span and the text as
    the target. The <eos> after a generated image carries no loss: the sampler ends an
    image at <eoi> by construction, and training it would teach "<eoi> -> <eos>" in most
    rows, against the captioning rows' "<eoi> -> caption" (models then wrote empty
    captions)."""
    s = Stream(layout).special("<bos>")
    if captioning:
        s.image(image_ids, generate=False).text(text_ids)
    else:
        s.text(text_ids).image(image_ids, generate=True)
    return s.special("<eos>", loss=captioning).arrays()


def response_image(s: Stream, image_ids, *, first: bool) -> Stream:
    """A generated image in the response. As the response's first part its `<boi> <res>`
    end the prompt (the sampler feeds them), so they carry no loss; later in a response
    the model must learn to open the image itself."""
    at = len(s)
    s.image(image_ids, generate=True)
    if first:
        s.cols["loss_weight"][at] = s.cols["loss_weight"][at + 1] = 0.0
    return s


def pack_row(examples: Sequence[dict[str, np.ndarray]], length: int, pad_id: int) -> dict:
    """Concatenates examples into one row of `length` tokens with segment ids 1..k."""
    row = {f: np.zeros((length,), np.float32 if f == "loss_weight" else np.int32) for f in FIELDS}
    row["tokens"][:] = pad_id
    at = 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex["tokens"])
        if at + n > length:
            raise ValueError(f"packed examples need {at + n} tokens but rows hold {length}")
        for f in FIELDS:
            row[f][at:at + n] = seg if f == "segment_ids" else ex[f]
        at += n
    return row


def check_no_loss_in_spans(row: dict[str, np.ndarray]) -> None:
    bad = (row["span_ids"] > 0) & (row["loss_weight"] != 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} tokens inside bidirectional spans carry loss")
