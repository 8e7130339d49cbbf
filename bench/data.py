"""What the real-data pipeline costs per example, against plain PIL decoding, in one run.

    python bench/data.py [--examples 1024] [--threads 2] [--train-steps 30]

Writes tar shards (img2dataset layout) of real photographs (scikit-image's sample photos,
randomly cropped, scaled to 320..1024 px and re-encoded as JPEG, PNG or WebP), then
measures, with the same number of worker threads:
  raw       read each image's bytes with tarfile and decode it with PIL
            (`Image.open(...).convert("RGB")`): the floor any pipeline pays;
  pipeline  mmgen's step pipeline over the same shards: index, read, decode (EXIF,
            mode conversion), resize + crop to 64 px, caption cleaning, text tokenising,
            example streams and first-fit packing; image tokens are a constant here,
            since the image tokenizer is the model, not the data pipeline;
and reports CPU seconds per example (process CPU time, all threads) and their ratio
(target <= 1.25). With --train-steps > 0 it also trains the tiny joint config on the
shards and reports the data-wait fraction of the training loop (needs a tokenizer run:
--tokenizer RUN, or one is trained for 2 steps).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mmgen.config import load_config
from mmgen.data import packing, steps
from mmgen.tokenizers import text as text_tok
from mmgen.tokenizers.layout import TokenLayout

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry")
WORDS = ("a photo of", "close-up of", "an old picture showing", "the view of", "a scan of")


def write_shards(root: Path, n: int, per_shard: int = 256, seed: int = 0) -> list[Path]:
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    paths, k = [], 0
    while k < n:
        path = root / f"{len(paths):05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(min(per_shard, n - k)):
                src = photos[k % len(photos)]
                h, w = src.shape[:2]
                ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                img = Image.fromarray(src[y:y + ch, x:x + cw])
                side = int(rng.integers(320, 1025))
                img = img.resize((side, max(int(side * ch / cw), 16)), Image.BICUBIC)
                fmt = ("JPEG", "JPEG", "PNG", "WEBP")[k % 4]
                buf = io.BytesIO()
                img.save(buf, fmt, **({"quality": 90} if fmt != "PNG" else {}))
                caption = f"{WORDS[k % len(WORDS)]} {PHOTOS[k % len(PHOTOS)]} number {k}"
                for name, data in ((f"{k:08d}.{fmt.lower().replace('jpeg', 'jpg')}",
                                    buf.getvalue()), (f"{k:08d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
        paths.append(path)
    return paths


def raw_decode(paths: list[Path], threads: int) -> tuple[float, int]:
    """CPU seconds and images for tarfile reads + PIL decodes of every image."""
    def one(path):
        count = 0
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png", ".webp")):
                    data = tar.extractfile(member).read()
                    Image.open(io.BytesIO(data)).convert("RGB")
                    count += 1
        return count

    t0 = time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(one, paths))
    return time.process_time() - t0, n


def pipeline(shard_glob: str, n: int, threads: int) -> tuple[float, int, float]:
    """CPU seconds, examples and packing efficiency of the step pipeline over n examples."""
    cfg = load_config(str(REPO / "configs/tiny.py"), [
        "--config.data.source=wds", f"--config.data.path={shard_glob}",
        "--config.data.seq_len=1280", "--config.data.examples_per_row=4.0"])
    layout = TokenLayout(image_codes=1000, image_grid=(16, 16))
    t0 = time.process_time()
    builder = steps.StepBuilder(cfg.data, global_batch=8, layout=layout,
                                text_tokenizer=text_tok.BYTES, log=lambda *_: None)
    const_ids = np.zeros(layout.tokens_per_image, np.int32)

    def one_step(step: int) -> packing.PackStats:
        examples, _ = builder.decoded_step(step)
        streams = []
        for ex in examples:
            ex.parts = [("image", const_ids) if w == "image" else (w, ids)
                        for w, ids in ex.parts]
            streams.append(builder.stream(ex))
        return packing.pack(streams, builder.rows, cfg.data.seq_len, layout.pad)[1]

    num_steps = n // builder.examples_per_step
    total = packing.PackStats()
    with ThreadPoolExecutor(threads) as pool:
        for stats in pool.map(one_step, range(num_steps)):
            total.add(stats)
    return time.process_time() - t0, num_steps * builder.examples_per_step, total.efficiency


def data_wait(shard_glob: str, tokenizer: str | None, steps_: int, root: Path
              ) -> tuple[float, float]:
    """Data-wait fraction of the tiny config trained on the tar shards (images encoded
    by the tokenizer on the fly) and on ArrayRecord shards with precomputed tokens."""
    if tokenizer is None:
        tokenizer = str(root / "tok")
        subprocess.run([sys.executable, "-m", "mmgen.cli", "train", "--config",
                        str(REPO / "configs/tokenizer_tiny.py"), "--workdir", tokenizer,
                        "--config.train.steps=2", f"--config.data.cache_dir={root}/cache"],
                       check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "mmgen.cli", "data", "prepare", "--src", shard_glob,
                    "--out", str(root / "ar"), "--num-shards", "2", "--tokenizer", tokenizer,
                    "--drop-images"], check=True, capture_output=True)
    waits = []
    for name, source, path in (("wds", "wds", shard_glob),
                               ("ar", "arrayrecord", f"{root}/ar/*.array_record")):
        work = root / f"joint_{name}"
        subprocess.run([sys.executable, "-m", "mmgen.cli", "train", "--config",
                        str(REPO / "configs/tiny.py"), "--workdir", str(work),
                        f"--config.tokenizer.checkpoint={tokenizer}",
                        f"--config.data.source={source}", f"--config.data.path={path}",
                        f"--config.train.steps={steps_}", f"--config.train.log_every={steps_ // 3}",
                        "--config.train.sample_every=0"], check=True, capture_output=True)
        rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        waits.append(float(np.mean([r["data_wait"] for r in rows[1:]])))  # 1st compiles
    return waits[0], waits[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="worker threads for both sides")
    p.add_argument("--train-steps", type=int, default=30, help="0 = skip the data-wait run")
    p.add_argument("--tokenizer", help="tokenizer run for the data-wait run")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mmgen_bench_data_"))
    (root / "shards").mkdir()
    paths = write_shards(root / "shards", args.examples)
    glob = str(root / "shards" / "*.tar")
    pipeline(glob, 64, args.threads)  # warm the file cache and imports
    raw_s, raw_n = raw_decode(paths, args.threads)
    pipe_s, pipe_n, eff = pipeline(glob, args.examples, args.threads)
    raw_per, pipe_per = raw_s / raw_n, pipe_s / pipe_n
    print(f"examples: {raw_n} photos (320..1024 px, JPEG/PNG/WebP) in {len(paths)} shards; "
          f"{args.threads} threads")
    print(f"raw PIL decode:   {raw_per * 1e3:7.2f} ms CPU per example")
    print(f"mmgen pipeline:   {pipe_per * 1e3:7.2f} ms CPU per example "
          f"(packing efficiency {eff:.1%})")
    print(f"ratio pipeline / raw: {pipe_per / raw_per:.2f} (target <= 1.25)")
    if args.train_steps:
        wds, ar = data_wait(glob, args.tokenizer, args.train_steps, root)
        print(f"tiny config, data wait of the training loop: {wds:.1%} from the tar shards "
              f"(images tokenised on the fly), {ar:.1%} from `mmgen data prepare "
              "--tokenizer` ArrayRecord shards")


if __name__ == "__main__":
    main()
