"""Image tokens of synthetic scenes, encoded once and stored beside their scenes.

Encoding a scene costs a forward pass of the image tokenizer; a training run reads
each scene many times, so tokens are computed once per (tokenizer, seed, split, N,
scene parameters) and kept as an .npz of ints (no pickle) plus a JSON-lines file of
scenes; the diffusion decoder adds the tokenizer's decodings of those ids (.npy, uint8).
Captions are NOT cached: each epoch draws a fresh template from the scene.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mmgen.data import synthetic

EncodeFn = Callable[[np.ndarray], np.ndarray]  # uint8 [B,H,W,3] -> int [B,h,w]

# Rendering is single-threaded PIL (~0.4 ms a scene): 300,000 scenes (configs/small.py)
# are two minutes of one core. From this many scenes on, worker processes render while
# the main process encodes; below it their start-up (each imports mmgen) is not repaid.
PARALLEL_MIN_SCENES = 50_000
MAX_RENDER_WORKERS = 16


def cache_path(root: str | Path, fingerprint: str, seed: int, split: str, num: int,
               scene_kwargs: dict | None = None) -> Path:
    """The cache directory of one (tokenizer, seed, split, N, scene parameters): scenes
    drawn with another `data.p_word` or `data.max_objects` are other scenes, so they get
    another directory instead of silently reusing these."""
    name = f"synthetic-{split}-s{seed}-n{num}-{fingerprint}"
    if scene_kwargs:
        params = json.dumps(scene_kwargs, sort_keys=True).encode()
        name += "-" + hashlib.sha256(params).hexdigest()[:8]
    return Path(root) / name


def _render(job: tuple) -> tuple[np.ndarray, list[dict]]:
    """Scenes [lo, hi) of one (seed, split): images uint8 [n,H,W,3] and scene records."""
    lo, hi, seed, split, scene_kwargs = job
    exs = [synthetic.example(i, seed, split, **scene_kwargs) for i in range(lo, hi)]
    return np.stack([e["image"] for e in exs]), [e["scene"].to_json() for e in exs]


def _rendered(jobs: list[tuple], workers: int) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """`_render` of each job, in order: here, or by `workers` processes that stay at most
    4 chunks each ahead of the consumer (bounded memory however slow the encoder)."""
    if workers <= 0:
        yield from map(_render, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent runs JAX's threads, which a fork can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        todo = iter(jobs)
        pending = deque(ex.submit(_render, j) for j in itertools.islice(todo, 4 * workers))
        while pending:
            out = pending.popleft().result()
            job = next(todo, None)
            if job is not None:
                pending.append(ex.submit(_render, job))
            yield out


def build(path: Path, encode: EncodeFn, *, num: int, seed: int, split: str,
          batch: int = 256, scene_kwargs: dict | None = None, log=print,
          workers: int | None = None) -> Path:
    """Renders `num` scenes, encodes them and writes `path`/{tokens.npz,scenes.jsonl}.
    `workers`: rendering processes (0: none; default: up to 16, one core left for the
    encoder, from PARALLEL_MIN_SCENES scenes on). The output does not depend on it."""
    if (path / "done").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    scene_kwargs = scene_kwargs or {}
    if workers is None:
        # the cores this process may run on (a container's or a scheduler's share)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        workers = min(MAX_RENDER_WORKERS, cores - 1) if num >= PARALLEL_MIN_SCENES else 0
    jobs = [(lo, min(num, lo + batch), seed, split, scene_kwargs) for lo in range(0, num, batch)]
    ids_chunks, scenes = [], []
    start = time.time()
    for (lo, hi, *_), (images, chunk_scenes) in zip(jobs, _rendered(jobs, workers), strict=True):
        ids_chunks.append(np.asarray(encode(images)).reshape(hi - lo, -1).astype(np.int32))
        scenes += chunk_scenes
        if log and (hi == num or (lo // batch) % 20 == 0):
            log(f"token cache {split}: {hi}/{num} scenes encoded ({time.time() - start:.0f}s)")
    tmp = path / f"tokens.tmp{os.getpid()}.npz"  # per process: hosts may share the cache
    np.savez(tmp, image_ids=np.concatenate(ids_chunks))
    os.replace(tmp, path / "tokens.npz")
    tmp = path / f"scenes.tmp{os.getpid()}.jsonl"
    with open(tmp, "w") as f:
        for s in scenes:
            f.write(json.dumps(s) + "\n")
    os.replace(tmp, path / "scenes.jsonl")
    (path / "done").write_text("ok\n")
    return path


# what reading a truncated, overwritten or half-deleted cache raises (np.load, json,
# CachedScenes' own check); other OS errors (permissions, a stale NFS handle) are not
# damage and propagate
_DAMAGED = (ValueError, EOFError, KeyError, zipfile.BadZipFile, FileNotFoundError)


def open_or_build(path: Path, encode: EncodeFn, *, log=print, **build_kwargs) -> CachedScenes:
    """`build` (if not done) and open the cache; a damaged one (a truncated copy, a full
    disk) is said in one line and rebuilt rather than failing every run that reads it.
    Hosts may share the cache: the damaged directory is renamed aside (one process wins the
    rename), so no process deletes files another has just rebuilt."""
    build(path, encode, log=log, **build_kwargs)
    try:
        return CachedScenes(path)
    except _DAMAGED as e:
        if log:
            log(f"token cache {path} is damaged ({type(e).__name__}: {e}); rebuilding it")
    aside = path.with_name(f"{path.name}.damaged-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process moved it first and is rebuilding too
        pass
    else:
        shutil.rmtree(aside, ignore_errors=True)
    build(path, encode, log=log, **build_kwargs)  # per-process temporary names: no clash
    return CachedScenes(path)


DecodeFn = Callable[[np.ndarray], np.ndarray]  # int [B,h,w] -> uint8 [B,H,W,3]


def build_decoded(scenes: CachedScenes, decode: DecodeFn, grid: tuple[int, int], *,
                  batch: int = 256, log=print) -> None:
    """Writes decoded.npy beside `scenes`' tokens, unless there: the tokenizer's own
    decoding of every cached scene's ids, uint8 [N,H,W,3], the diffusion decoder's refiner
    input; then `scenes` yields it (CachedScenes.attach_decoded). Its training reads each
    scene several times (configs/decoder_tiny.py: 3 epochs), and decoding a batch in a
    grain thread queues behind the train step on the same device, so it is decoded once,
    in large batches. Written through a temporary name: a failed build leaves no file; a
    damaged one (a truncated copy) is said in one line and rebuilt (os.replace swaps it:
    hosts sharing the cache keep reading whichever file they opened)."""
    path, ids = scenes.path, scenes.image_ids
    out = path / "decoded.npy"
    if out.exists():
        try:
            scenes.attach_decoded()
            return
        except _DAMAGED as e:
            if log:
                log(f"token cache {out} is damaged ({type(e).__name__}: {e}); rebuilding it")
    tmp = path / f"decoded.tmp{os.getpid()}.npy"  # per process: hosts may share the cache
    images = None
    start = time.time()
    try:
        for lo in range(0, len(ids), batch):
            chunk = np.asarray(decode(ids[lo:lo + batch].reshape(-1, *grid)))
            if images is None:  # written in place: N images may not fit twice in memory
                images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                   shape=(len(ids), *chunk.shape[1:]))
            images[lo:lo + len(chunk)] = chunk
            hi = lo + len(chunk)
            if log and (hi == len(ids) or (lo // batch) % 20 == 0):
                log(f"token cache: {hi}/{len(ids)} tokenizer decodings "
                    f"({time.time() - start:.0f}s)")
        images.flush()
        del images
        os.replace(tmp, out)  # identical bytes if another process got there first
    finally:
        tmp.unlink(missing_ok=True)
    scenes.attach_decoded()


class CachedScenes:
    """A grain random-access source: index -> {"image_ids", "scene"[, "decoded"]}, the
    last (uint8 [H,W,3], memory-mapped) once attached (build_decoded)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with np.load(self.path / "tokens.npz", allow_pickle=False) as z:
            self.image_ids = z["image_ids"]
        with open(self.path / "scenes.jsonl") as f:
            self.scenes = [json.loads(line) for line in f]
        self.decoded = None
        if len(self.scenes) != len(self.image_ids):
            raise ValueError(f"token cache {path} is inconsistent; delete it to rebuild")

    def attach_decoded(self) -> None:
        """Items carry "decoded" from here on, read memory-mapped from decoded.npy."""
        decoded = np.load(self.path / "decoded.npy", mmap_mode="r", allow_pickle=False)
        if decoded.dtype != np.uint8 or decoded.ndim != 4 or len(decoded) != len(self.scenes):
            raise ValueError(f"it holds {decoded.dtype} {decoded.shape}, not "
                             f"{len(self.scenes)} uint8 images")
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        item = {"image_ids": self.image_ids[i], "scene": self.scenes[i]}
        if self.decoded is not None:
            item["decoded"] = np.asarray(self.decoded[i])
        return item
