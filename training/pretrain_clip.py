"""Pretrain the offline CLIP contrastively on posts, so a demo run starts from a CLIP whose
image and text towers already agree a little.

    python training/pretrain_clip.py --out runs/demo/tiny_clip --input runs/demo/pretrain_posts/posts.csv
    python training/pretrain_clip.py --out runs/demo/tiny_clip --data runs/demo/data  # its train split
    python -m training.pretrain_clip --help

1. ``--data``: the train split of a preprocess.py output, whose records are posts already
   prepared (val and test are never read); or ``--input``: a table read through
   ``data_preprocessing.table`` (``--image-col``/``--text-col``, any delimiter or encoding,
   image URLs through the download cache), as preprocessing reads it.
2. A random-init checkpoint is built by ``models/tiny_clip.py`` with its tokenizer learned
   from the posts' captions.
3. A table's posts are prepared once with ``posts.prepare_post`` (the server's own
   function); a seeded ``--heldout-fraction`` of the posts is held out.
4. Training batches go through the project's ``PostBatcher``; the optimizer groups are
   ``training.loop.param_groups`` (no decay on biases and norms), with AdamW and a warmup +
   cosine schedule over ``--max-epochs``.
5. After every epoch the held-out posts are scored by image->text retrieval
   (``retrieval_scores``' rank score). The best epoch's weights are kept; training stops
   once ``--patience`` epochs in a row have not beaten it: a few thousand posts overfit
   within a few epochs, and the epochs after that only cost time.
6. The kept weights are saved over the random init, with ``pretrain.json``: the config,
   the data counts, the per-epoch curve and which epoch was kept and why.

Pretrain only on posts kept apart from your val and test splits (``--data`` reads only the
train split), or the metrics will be optimistic. Nothing heavy is imported
before the arguments are parsed, so ``--help`` is instant.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import (atomic_dir, bar_disabled, config_dict, field, git_commit, parse_config, setup_logging,
                           write_json_atomic)
from data_preprocessing.download import DownloadArgs, DownloadConfig
from data_preprocessing.table import (ColumnMap, PostsTable, ReadOptions, TableError, encoding_field, image_source,
                                      max_cell_chars_field, read_table, resolve_image_sources, sep_field,
                                      split_names)
from models.tiny_clip import PRESETS

logger = logging.getLogger(__name__)

# The only split of a --data directory pretraining reads: val chooses the regressor's epoch
# and calibrates its intervals, test scores it, so neither may shape the CLIP.
TRAIN_SPLIT = "train"


@dataclasses.dataclass
class PretrainConfig(DownloadArgs):
    """Pretrain the offline CLIP contrastively on a train split or a posts table (best held-out epoch kept).

    Pretrain only on posts kept apart from your val and test splits (--data reads only the
    train split), or the metrics will be optimistic.
    """

    out: str = field(help="output checkpoint directory (replaced atomically if it exists)")
    data: str = field("", help="a preprocess.py output directory: pretrain on its train split's images and "
                               "captions (no labels are read; val and test are never touched). Give --data or "
                               "--input")
    input: str = field("", help="or a posts table (CSV or JSONL, read as preprocess.py reads it); use posts kept "
                                "apart from the test split (e.g. a demo set made with another seed) so test "
                                "metrics stay honest")
    image_col: str = field("image_path", help="column(s) with the image path (relative to the table's folder) or "
                                              "http(s) URL (downloaded once into --image-cache), comma-separated; "
                                              "the first non-empty cell wins")
    text_col: str = field("description", help="column with the raw caption")
    sep: str = sep_field()
    encoding: str = encoding_field()
    max_cell_chars: int = max_cell_chars_field()
    preset: str = field("tiny", help="architecture: tiny (CPU tests) or b32 (ViT-B/32 shape, benchmarks)",
                        choices=PRESETS)
    seed: int = field(0, help="seed for weights, data split and shuffling")
    vocab_size: int = field(4096, help="upper bound on the BPE vocabulary (small corpora give fewer merges)")
    max_epochs: int = field(20, help="most epochs; the LR schedule runs over these, so a run is reproducible "
                                     "for a seed whatever epoch it stops at")
    patience: int = field(3, help="stop after this many epochs in a row without a better held-out retrieval "
                                  "rank score (0 = run all --max-epochs); the best epoch is the one kept")
    minutes: float = field(6.0, help="wall-clock safety cap: training stops here even if it would go on "
                                     "(then the result depends on machine speed)")
    batch_size: int = field(32, help="contrastive batch size (in-batch negatives)")
    lr: float = field(5e-4, help="peak AdamW learning rate (5%% linear warmup, then cosine)")
    weight_decay: float = field(0.1, help="AdamW weight decay on matrices (never on biases/LayerNorm)")
    heldout_fraction: float = field(0.1, help="fraction of posts held out: retrieval on them, measured after "
                                              "every epoch, chooses the checkpoint kept and when to stop")

    def __post_init__(self):
        super().__post_init__()  # the download flags (--image-cache, ...) of an image-URL table
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}")
        if bool(self.data) == bool(self.input):
            raise ValueError("give one of --data (a preprocess.py output) or --input (a posts table)")
        if self.input and not Path(self.input).is_file():
            raise ValueError(f"--input: no such file {self.input}")
        if self.data and not (Path(self.data) / f"{TRAIN_SPLIT}.pkl").is_file():
            raise ValueError(f"--data: no {TRAIN_SPLIT}.pkl in {self.data} (run data_preprocessing/preprocess.py "
                             f"--out {self.data} first)")
        if self.minutes <= 0 or self.max_epochs < 1 or self.patience < 0:
            raise ValueError("--minutes must be > 0, --max-epochs >= 1 and --patience >= 0")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be >= 2 (contrastive loss needs negatives)")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError("--heldout-fraction must be in (0, 1)")
        self.table_columns()
        ReadOptions.of(self)

    def table_columns(self) -> ColumnMap:
        """Image and caption columns; pretraining reads no label."""
        return ColumnMap(split_names(self.image_col), self.text_col, label=None)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def read_pretrain_table(cfg: PretrainConfig) -> PostsTable:
    """The ``--input`` table through ``data_preprocessing.table`` (one ``error:`` line if unreadable)."""
    try:
        return read_table(Path(cfg.input).resolve(), cfg.table_columns(), ReadOptions.of(cfg))
    except TableError as e:
        raise SystemExit(f"error: --input: {e}") from None


def caption_texts(table: PostsTable) -> list[str]:
    """The cleaned, non-empty captions of a posts table: the tokenizer's training text."""
    from data_preprocessing.prepare import clean_text

    return [c for c in (clean_text(d) for d in table.captions) if c]


def load_posts(table: PostsTable, image_processor, download: DownloadConfig | None = None) -> tuple[list, dict]:
    """Every usable row as a ``posts.Post`` (``prepare_post``, pre-resized for ``image_processor``),
    and the counts: rows, usable, rejected by reason. Image URLs are fetched through
    ``download`` (its cache first; default: the default cache and limits) as preprocessing
    fetches them."""
    from tqdm.auto import tqdm

    from data_preprocessing.posts import PrepareConfig, prepare_post
    from data_preprocessing.prepare import ImageError, ResizePolicy, clean_text

    prep = PrepareConfig(resize=ResizePolicy.from_image_processor(image_processor))
    rejects: Counter = Counter()
    todo = []  # (row, image source) of the rows worth decoding
    for row, (raw, desc) in enumerate(zip(table.images, table.captions)):
        if not clean_text(desc):
            rejects["empty_caption"] += 1  # nothing to contrast the image with
        elif not raw:
            rejects["missing_path"] += 1
        else:  # a relative path hangs off the table's folder, not the working directory
            todo.append((row, image_source(raw, table.path.parent)))
    # URL cells: the download seam (a URL preprocessing cached is not fetched again)
    local, unresolved = resolve_image_sources(todo, download or DownloadConfig())
    rejects.update(reason for _, reason, _ in unresolved)

    def prepared(item):
        row, path = item
        try:
            return prepare_post(path, table.captions[row], {}, prep)
        except ImageError as e:
            return e.reason

    # Threads: PIL decodes and resizes without the GIL (2,000 demo posts on 2 cores: 14.5 s,
    # 19.9 s on one thread); map keeps the table's order whatever the thread count.
    posts = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for got in tqdm(pool.map(prepared, local), total=len(local), desc="prepare posts", unit="post",
                        disable=bar_disabled()):
            if isinstance(got, str):
                rejects[got] += 1
            else:
                posts.append(got)
    counts = {"rows": len(table), "usable": len(posts), "rejected": dict(rejects)}
    logger.info("posts: %d rows, %d usable, rejected %s", len(table), len(posts), dict(rejects) or "none")
    return posts, counts


def read_train_records(data_dir: str) -> tuple[list, list[str], dict]:
    """The train split of a preprocess.py output as posts (a record is a post preprocessing
    already prepared), the tokenizer's texts, and the counts. Records with an empty caption
    are left out: there is nothing to contrast their image with."""
    from data_preprocessing.records import RecordError, UnsafePickleError, iter_records

    path = Path(data_dir) / f"{TRAIN_SPLIT}.pkl"
    try:
        records = list(iter_records(path))
    except (RecordError, UnsafePickleError, OSError, EOFError) as e:
        raise SystemExit(f"error: --data: {e}") from None
    posts = [r for r in records if r.text]
    counts = {"rows": len(records), "usable": len(posts),
              "rejected": {"empty_caption": len(records) - len(posts)} if len(posts) < len(records) else {}}
    logger.info("posts: %d train records of %s, %d usable, rejected %s", len(records), data_dir, len(posts),
                counts["rejected"] or "none")
    return posts, [p.text for p in posts], counts


def check_records(data_dir: str, image_processor) -> None:
    """Refuse records this CLIP would see differently from serving (``training.data.check_data``)."""
    from training.config import DataRefused
    from training.data import check_data

    try:
        check_data(data_dir, image_processor)
    except DataRefused as e:
        raise SystemExit(f"error: --data: {e}") from None


def split_posts(posts: Sequence, cfg: PretrainConfig) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, ``heldout_fraction`` of the posts (at least 2) held out."""
    import torch

    perm = torch.randperm(len(posts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_held = max(2, round(len(posts) * cfg.heldout_fraction))
    return [posts[i] for i in perm[n_held:]], [posts[i] for i in perm[:n_held]]


def clip_inputs(batcher, posts: Sequence) -> dict:
    """``CLIPModel`` inputs for ``posts``: ``PostBatcher``'s tensors, the uint8 pixels
    rescaled and normalised as ``CLIPRegressor`` does it in training and serving (in torch:
    the processor's own normalisation took a fifth of a tiny-CLIP step). pixel_values
    (B, 3, H, W) float, input_ids/attention_mask (B, T), T = the batch's longest caption."""
    from models.clip_regressor import normalize_uint8, processor_normalization

    batch = batcher(posts)
    pixel_values = normalize_uint8(batch["pixel_values"], *processor_normalization(batcher.processor.image_processor))
    return {"pixel_values": pixel_values, "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# ---------------------------------------------------------------------------------------
# Evaluation and model choice
# ---------------------------------------------------------------------------------------


def evaluate(model, batcher, posts: Sequence, batch_size: int) -> dict:
    """Held-out contrastive loss and image->text retrieval over all ``posts``.

    ``loss`` is CLIP's own, averaged over batches of ``batch_size`` as in training (chance
    about ln(batch_size)); ``retrieval_top1`` and ``rank_score`` rank all N captions for
    each image (see ``retrieval_scores``).
    """
    import torch

    model.eval()
    loss_sum, n_loss, img, txt = 0.0, 0, [], []
    with torch.no_grad():
        for part in _chunks(posts, batch_size):
            out = model(**clip_inputs(batcher, part), return_loss=True)
            if len(part) >= 2:  # one pair has no negatives: no loss
                loss_sum += float(out.loss) * len(part)
                n_loss += len(part)
            img.append(out.image_embeds)  # (b, D) L2-normalised
            txt.append(out.text_embeds)  # (b, D) L2-normalised
    if n_loss == 0:
        return {"loss": None, "retrieval_top1": None, "rank_score": None, "n": len(posts)}
    top1, rank_score = retrieval_scores(torch.cat(img) @ torch.cat(txt).T, [p.text for p in posts])
    return {"loss": round(loss_sum / n_loss, 4), "retrieval_top1": round(top1, 4),
            "rank_score": round(rank_score, 4), "n": len(posts)}


def retrieval_scores(sims, captions: Sequence[str]) -> tuple[float, float]:
    """Image->text retrieval from similarities ``sims`` (N images, N captions; pair i is true).

    ``top1``: share of images whose most similar caption is their own (chance ~1/N).
    ``rank_score``: the share of other captions that rank below the true one, averaged
    over images (chance 0.5, perfect 1; similarity ties count half). It uses every rank,
    not just the first, so it still resolves models whose top-1 is a handful of hits: on
    the 193 held-out demo posts top-1 moved between 1 and 4 hits over 20 epochs, noise
    that picked an overfit epoch. Captions identical to the true one count as the true
    caption in both scores, so posts sharing a caption are no misses.
    """
    import torch

    ids: dict[str, int] = {}
    group = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])  # (N,) one id per distinct caption
    same = group[:, None] == group[None, :]  # (N, N) caption j is image i's caption
    top1 = same[torch.arange(len(sims)), sims.argmax(dim=1)].float().mean()
    true = sims.diagonal()[:, None]  # (N, 1) similarity to the true caption
    below = ((sims < true) & ~same).sum(dim=1) + 0.5 * ((sims == true) & ~same).sum(dim=1)
    others = (~same).sum(dim=1)
    if int(others.max()) == 0:  # every post has the same caption: nothing to rank against
        return float(top1), 1.0
    keep = others > 0
    return float(top1), float((below[keep] / others[keep]).mean())


def is_better(candidate: dict, best: dict | None) -> bool:
    """Model selection: the higher held-out ``rank_score`` wins; a tie goes to the lower
    held-out loss. Strict comparisons keep the earlier epoch on a full tie, so the choice
    is reproducible."""
    if best is None:
        return True
    if candidate["heldout_rank_score"] != best["heldout_rank_score"]:
        return candidate["heldout_rank_score"] > best["heldout_rank_score"]
    return candidate["heldout_loss"] < best["heldout_loss"]


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainRun:
    """Where pretraining stands: the optimizer and schedule step per batch; the deadline is the minutes cap."""

    opt: object
    scheduler: object
    gen: object  # torch.Generator for the epoch shuffles
    batch_size: int
    steps_per_epoch: int
    deadline: float  # time.perf_counter() value
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)  # per-step training loss
    stopped_by: str = "max_epochs"  # or "patience", "minutes"


def start_run(model, cfg: PretrainConfig, n_train: int) -> PretrainRun:
    """AdamW over the shared decay/no-decay groups, warmup + cosine over ``--max-epochs``.

    The schedule follows steps only, never the clock or the stopping epoch, so the LR at
    every step (and so the kept weights) is the same for a seed on any machine."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from training.loop import param_groups

    bs = min(cfg.batch_size, n_train)
    steps_per_epoch = max(1, n_train // bs)  # drop the ragged last batch: 1-2 pairs give a near-free loss
    total = steps_per_epoch * cfg.max_epochs
    # The fused kernel, as training's phases use it: per-tensor AdamW costs more than the
    # tiny CLIP's forward and backward on a CPU.
    opt = torch.optim.AdamW(param_groups(model, "clip", cfg.lr, cfg.weight_decay), fused=True)
    scheduler = get_cosine_schedule_with_warmup(opt, max(1, round(0.05 * total)), total)
    return PretrainRun(opt, scheduler, torch.Generator().manual_seed(cfg.seed), bs, steps_per_epoch,
                       deadline=time.perf_counter() + cfg.minutes * 60.0)


def train_one_epoch(model, batcher, train: Sequence, run: PretrainRun, bar) -> float:
    """One shuffled pass of contrastive steps (CLIP's own loss); returns the epoch's mean loss.

    Stops early, setting ``run.stopped_by``, when the wall-clock cap is reached.
    """
    import torch

    model.train()
    order = torch.randperm(len(train), generator=run.gen).tolist()
    first = len(run.losses)
    for b in range(run.steps_per_epoch):
        if time.perf_counter() >= run.deadline:
            logger.warning("pretraining hit the --minutes cap at step %d; the result depends on machine speed",
                           run.step)
            run.stopped_by = "minutes"
            break
        rows = order[b * run.batch_size:(b + 1) * run.batch_size]
        loss = model(**clip_inputs(batcher, [train[i] for i in rows]), return_loss=True).loss
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.scheduler.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        run.losses.append(round(loss.item(), 4))
        run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
    done = run.losses[first:]
    return round(sum(done) / len(done), 4) if done else float("nan")


def pretrain(model, batcher, train: Sequence, heldout: Sequence, cfg: PretrainConfig) -> dict:
    """Train, evaluate on ``heldout`` after every epoch, stop after ``--patience`` epochs
    without a better one (or at ``--max-epochs``, or the cap), and leave ``model`` holding
    the epoch with the best held-out retrieval. Returns the run's record, with the curve."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    run = start_run(model, cfg, len(train))
    curve, best, best_state = [], None, None
    bar = tqdm(total=run.steps_per_epoch * cfg.max_epochs, desc="pretrain", unit="step", disable=bar_disabled())
    for epoch in range(1, cfg.max_epochs + 1):
        steps_before = run.step
        train_loss = train_one_epoch(model, batcher, train, run, bar)
        if run.step == steps_before:
            break  # the cap fell before this epoch's first step: nothing new to evaluate
        held = evaluate(model, batcher, heldout, cfg.batch_size)
        row = {"epoch": epoch, "step": run.step, "train_loss": train_loss, "heldout_loss": held["loss"],
               "heldout_rank_score": held["rank_score"], "heldout_top1": held["retrieval_top1"]}
        curve.append(row)
        if is_better(row, best):
            # A copy, not a reference: the next optimizer step updates the tensors in place.
            best, best_state = row, {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info("epoch %d: train loss %.4f, held-out loss %.4f, rank score %.4f, top-1 %.4f%s", epoch,
                    train_loss, held["loss"], held["rank_score"], held["retrieval_top1"],
                    "  (best so far)" if best is row else "")
        if run.stopped_by == "minutes":
            break
        if cfg.patience and epoch - best["epoch"] >= cfg.patience:
            logger.info("stopping: %d epochs without a better held-out rank score than epoch %d", cfg.patience,
                        best["epoch"])
            run.stopped_by = "patience"
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"steps": run.step, "epochs_completed": run.step / run.steps_per_epoch,
            "steps_per_epoch": run.steps_per_epoch, "batch_size": run.batch_size, "stopped_by": run.stopped_by,
            "train_seconds": round(time.perf_counter() - t0, 2), "losses": run.losses, "curve": curve,
            "best": best}


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def _log_choice(run: dict, before: dict) -> None:
    def scores(m: dict) -> str:
        return (f"rank score {m['heldout_rank_score']:.4f}, top-1 {m['heldout_top1']:.4f}, "
                f"loss {m['heldout_loss']:.4f}")

    best, last = run["best"], run["curve"][-1]
    untrained = {"heldout_rank_score": before["rank_score"], "heldout_top1": before["retrieval_top1"],
                 "heldout_loss": before["loss"]}
    logger.info("kept epoch %d of %d (best held-out retrieval rank score): %s; last epoch: %s; untrained: %s",
                best["epoch"], last["epoch"], scores(best), scores(last), scores(untrained))
    if best["heldout_rank_score"] <= before["rank_score"]:
        logger.warning("no epoch retrieved better than the untrained model on the held-out posts")


def pretrain_record(cfg: PretrainConfig, data: dict, build_info: dict, seconds: dict, run: dict,
                    before: dict) -> dict:
    """``pretrain.json``: how the checkpoint was made, and which epoch it is and why.

    ``selection.curve`` has one row per epoch (train loss; held-out loss, rank score, top-1);
    ``heldout`` gives the untrained model (``before``), the kept epoch (``after``) and the last.
    """
    best = run["best"]
    return {
        "config": config_dict(cfg),
        "data": data,
        "model": build_info,
        "seconds": seconds,
        "training": {k: v for k, v in run.items() if k not in ("losses", "curve", "best")},
        "selection": {"rule": "epoch with the highest held-out image->text rank_score (ties: lower held-out "
                              "loss, then the earlier epoch); stop after --patience epochs without a better one",
                      "best_epoch": best["epoch"] if best else None, "best": best, "curve": run["curve"]},
        "heldout": {"before": before, "after": best, "last": run["curve"][-1] if run["curve"] else None},
        "losses": run["losses"],
        "git_commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> Path:
    # 1. Parse args (no torch yet: --help and usage errors answer at once) and log the config.
    cfg = parse_config(PretrainConfig, argv)
    setup_logging()
    logger.info("config: %s", config_dict(cfg))
    out, t_start = Path(cfg.out), time.perf_counter()
    if cfg.data:  # records preprocessing already prepared: nothing to decode
        records, texts, counts = read_train_records(cfg.data)
        table, source = None, {"source": str(Path(cfg.data).resolve()), "split": TRAIN_SPLIT}
    else:
        table = read_pretrain_table(cfg)
        texts, source = caption_texts(table), {"source": str(table.path), "table": table.schema()}

    from transformers import CLIPModel, CLIPProcessor

    from models.clip_regressor import PostBatcher
    from models.tiny_clip import write_checkpoint

    with atomic_dir(out) as tmp:
        # 2. Tokenizer from the captions, then the random init that
        # build_tiny_clip(texts=texts) gives, so "before" is reproducible.
        build_info = write_checkpoint(tmp, cfg.preset, cfg.seed, texts, cfg.vocab_size)
        model, processor = CLIPModel.from_pretrained(tmp), CLIPProcessor.from_pretrained(tmp)
        batcher = PostBatcher.from_clip(processor, model.config)

        # 3. Prepare every post once (records already are); split off a held-out set.
        t_decode = time.perf_counter()
        if table is None:
            check_records(cfg.data, processor.image_processor)
            posts = records
        else:
            posts, counts = load_posts(table, processor.image_processor, cfg.download_config())
        if len(posts) < 4:
            raise SystemExit(f"error: only {len(posts)} usable posts in {source['source']}, need >= 4")
        train, heldout = split_posts(posts, cfg)
        decode_s = time.perf_counter() - t_decode
        logger.info("pretraining on %d posts, %d held out", len(train), len(heldout))

        # 4. Train, evaluating every epoch; the model comes back holding the best epoch.
        before = evaluate(model, batcher, heldout, cfg.batch_size)
        logger.info("held-out before: loss %s, image->text rank score %s, top-1 %s", before["loss"],
                    before["rank_score"], before["retrieval_top1"])
        run = pretrain(model, batcher, train, heldout, cfg)
        if run["best"] is not None:
            _log_choice(run, before)

        # 5. Save the chosen weights over the random init, plus the record of how they were made.
        model.save_pretrained(tmp)
        seconds = {"decode": round(decode_s, 2), "train": run["train_seconds"],
                   "total": round(time.perf_counter() - t_start, 2)}
        data = {**source, "tokenizer_texts": len(texts), **counts, "train": len(train), "heldout": len(heldout)}
        write_json_atomic(tmp / "pretrain.json", pretrain_record(cfg, data, build_info, seconds, run, before))
    logger.info("wrote %s in %.1fs", out, time.perf_counter() - t_start)
    return out


if __name__ == "__main__":
    main()
