"""Image token ids -> pixels: the diffusion decoder when a decoder run is given, else the
tokenizer's own (autoencoder) decoder. Used by `mmgen sample --decoder-steps`."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mmgen.config import ConfigError
from mmgen.load import DECODER_NEEDED, ImageCodec, chunked_call, expect_kind, load_run
from mmgen.models.decoder import euler_sample
from mmgen.tokenizers.image_autoencoder import images_to_unit, unit_to_images
from mmgen.tokenizers.layout import check_same

CHUNK = 32  # images per compiled call: one program serves any N (zero-padded chunks)


class DiffusionDecoder:
    """A trained decoder run, ready to sample; compiled once per number of Euler steps."""

    def __init__(self, decoder_dir: str | Path):
        expect_kind(decoder_dir, "decoder", DECODER_NEEDED)
        self.model, self.cfg, self.layout, self.step = load_run(decoder_dir, use_ema=True)
        self.dir = str(decoder_dir)
        graphdef, params = nnx.split(self.model)
        self._sample = jax.jit(
            lambda ids, noise, coarse, steps: euler_sample(
                nnx.merge(graphdef, params), ids, noise, steps, coarse),
            static_argnums=3)

    def check_codec(self, codec: ImageCodec) -> None:
        """Raises LayoutMismatchError unless the decoder was trained on `codec`'s ids."""
        check_same(self.layout, codec.layout, f"the tokenizer given to render with {self.dir}")

    def noise(self, n: int, seed: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Starting noise [n, H, W, 3] times sample.noise_scale; image i's depends on
        (seed, i) only, so it does not change with how the ids are chunked. (H, W):
        `shape`, by default the square data.image_size the decoder was trained on."""
        h, w = shape or (self.cfg.data.image_size,) * 2
        key = jax.random.key(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(n))
        noise = jax.vmap(lambda k: jax.random.normal(k, (h, w, 3)))(keys)
        return np.asarray(noise * self.cfg.sample.get("noise_scale", 1.0), np.float32)

    def render(self, ids_NHW: np.ndarray, codec: ImageCodec, steps: int | None = None,
               seed: int = 0) -> np.ndarray:
        """uint8 [N, H, W, 3] sampled in `steps` Euler steps (default: sample.steps). The
        network is convolutional: a non-square grid (`mmgen sample --aspect`) is rendered at
        its own size, H x W = the grid times the tokenizer's downsample."""
        self.check_codec(codec)
        steps = int(self.cfg.sample.steps if steps is None else steps)
        if steps < 1:  # zero Euler steps would return the starting noise as the image
            raise ConfigError(f"the diffusion decoder needs at least 1 Euler step, got {steps}")
        ids_NHW = np.asarray(ids_NHW, np.int32)
        ds = self.cfg.model.downsample
        noise = self.noise(len(ids_NHW), seed, (ids_NHW.shape[1] * ds, ids_NHW.shape[2] * ds))
        arrays = [ids_NHW, noise]
        if self.cfg.model.refine:  # the refiner's input: the tokenizer's own decoding
            arrays.append(np.asarray(images_to_unit(codec.decode(ids_NHW))))
        sample = lambda ids, noise, coarse=None: self._sample(ids, noise, coarse, steps)  # noqa: E731
        return unit_to_images(chunked_call(sample, arrays, CHUNK))


_LOADED: dict[tuple[str, int], DiffusionDecoder] = {}


def load_decoder(decoder_dir: str | Path) -> DiffusionDecoder:
    """The decoder run at its latest checkpoint, loaded once per (directory, step)."""
    from mmgen.load import read_run_metadata

    step = read_run_metadata(decoder_dir)[2]
    key = (str(Path(decoder_dir).resolve()), step)
    if key not in _LOADED:
        _LOADED[key] = DiffusionDecoder(decoder_dir)
    return _LOADED[key]


def render_images(ids_NHW: np.ndarray, codec: ImageCodec, decoder_steps: int | None = None,
                  decoder_dir: str | None = None, seed: int = 0) -> np.ndarray:
    """Image token ids [N, h, w] -> uint8 [N, H, W, 3].

    With `decoder_dir` (a decoder run or export) pixels are sampled by the diffusion decoder
    in `decoder_steps` Euler steps (None: the run's sample.steps), deterministic given
    `seed`; without it the tokenizer's autoencoder decodes them (`decoder_steps` unused)."""
    if decoder_dir is None:
        return codec.decode(ids_NHW)
    return load_decoder(decoder_dir).render(ids_NHW, codec, decoder_steps, seed)


def laplacian_energy(images_uint8: np.ndarray) -> np.ndarray:
    """Mean |4-neighbour Laplacian| per image [N] (0-255 scale, interior pixels, all
    channels): a high-frequency energy measure. Blurry decoders fall below the ground
    truth's value; crisp edges and strokes bring it back up (noise would overshoot)."""
    x = np.asarray(images_uint8, np.float64)
    lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1]
           - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    return np.abs(lap).mean(axis=(1, 2, 3))


def compare_decoders(codec: ImageCodec, decoder_dir: str | Path, *, num: int = 128,
                     num_words: int = 256, steps: int | None = None, seed: int = 0) -> dict:
    """The autoencoder's decoder ("ae") vs the diffusion decoder ("diffusion") on held-out
    synthetic scenes, both decoding the same token ids: PSNR to the ground truth; the
    mean Laplacian energy E and its relative gap to the ground truth's,
    |mean E(x) - mean E(truth)| / mean E(truth) (how much high-frequency detail the
    decoder restores overall), and the stricter per-image gap, the mean over images of
    |E(x) - E(truth)| / E(truth) (grain in flat images does not cancel missing edges in
    others); word accuracy (scene checker's read_word) on held-out word+colour scenes."""
    from mmgen.data import synthetic
    from mmgen.eval import scene_checker
    from mmgen.eval.image_metrics import psnr

    size = codec.cfg.data.image_size
    truth = np.stack([synthetic.example(i, 1234, "heldout", size=size)["image"]
                      for i in range(num)])
    word_scenes = scene_checker.category_scenes("text", num_words, seed=1234)
    words = np.stack([synthetic.render(s, size) for s in word_scenes])
    out = {}
    e_truth = laplacian_energy(truth)
    truth_ids, words_ids = codec.encode(truth), codec.encode(words)  # both decoders read these
    for name, dec_dir in (("ae", None), ("diffusion", str(decoder_dir))):
        images = render_images(truth_ids, codec, steps, dec_dir, seed)
        e = laplacian_energy(images)
        written = render_images(words_ids, codec, steps, dec_dir, seed)
        read = [scene_checker.read_word(im) == s.word
                for im, s in zip(written, word_scenes, strict=True)]
        out[name] = {"psnr": psnr(images, truth), "laplacian": float(e.mean()),
                     "laplacian_gap": float(abs(e.mean() - e_truth.mean()) / e_truth.mean()),
                     "laplacian_gap_per_image": float(np.mean(np.abs(e - e_truth) / e_truth)),
                     "word_accuracy": float(np.mean(read))}
    out["truth"] = {"laplacian": float(e_truth.mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m mmgen.sample.render TOKENIZER_DIR DECODER_DIR [STEPS]: prints the
    comparison of compare_decoders as JSON. Bad arguments and runs of the wrong kind or
    tokenizer are one line and exit 2, before anything is decoded (as for `mmgen`)."""
    import argparse
    import json
    import sys

    from mmgen.argtypes import int_in
    from mmgen.cli import user_errors

    p = argparse.ArgumentParser(prog="python -m mmgen.sample.render",
                                description="compare the diffusion decoder with the "
                                "tokenizer's own decoder (docs/decoder.md)")
    p.add_argument("tokenizer", help="image tokenizer run or export")
    p.add_argument("decoder", help="diffusion decoder run or export trained on its ids")
    p.add_argument("steps", nargs="?", type=int_in(1),
                   help="Euler steps (default: the decoder's sample.steps)")
    args = p.parse_args(argv)
    try:
        codec = ImageCodec(args.tokenizer)
        load_decoder(args.decoder).check_codec(codec)  # before the autoencoder's half runs
        result = compare_decoders(codec, args.decoder, steps=args.steps)
    except user_errors() as e:  # as `mmgen` reports them
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
