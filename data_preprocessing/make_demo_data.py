"""Generate a synthetic posts export whose engagement has a known law.

Output of ``python data_preprocessing/make_demo_data.py --out DIR --n N --seed S``::

    DIR/posts.csv      what an API pull looks like, exactly these columns (POST_COLUMNS):
                       post_id, account_id, posted_at (ISO 8601 UTC, "+0000", over about 18
                       months before the export), image_path, description, engagement
                       (= likes + comments), likes, comments, followers, platform (some cells
                       empty), reach (an outcome: counted after posting, never an input)
    DIR/images/*.jpg   one JPEG per post, 320-1280 px a side, portrait/landscape/square
    DIR/meta.json      generator version, seed, the export time (as_of) and time zone, the
                       label law's coefficients, sigma, R² ceilings, the preprocessing flags
    DIR/truth.csv      per-post latent attributes, the noiseless f, the noisy y and the final
                       counts. For evaluation only: a model must never read it.

Each post has an image *topic* (beach, food, pets, city, forest, fitness) drawn with PIL
shapes, gradients and grain, plus continuous visual attributes (brightness,
colourfulness, number of salient objects). Its caption is written like a real post
(hashtags, @mentions, URLs, emoji, ``&amp;``, SHOUTING, line breaks, sometimes empty) and
names a caption topic that matches the image's topic, names another one, or names none.
Each post belongs to an account (about ``POSTS_PER_ACCOUNT`` posts each) with its own
follower count, platform and effect on engagement, and is posted at a uniformly random
instant in the ``SPAN_DAYS`` before the export time ``AS_OF``.

The label law (coefficients in ``LabelLaw``; ``label_function_doc()`` renders the table,
which is also saved in meta.json)::

    f(post) = base + image_topic[t_img] + brightness + colourfulness + objects
                   + caption_topic[t_cap] + hashtags + call_to_action + length + sentiment
                   + agreement(t_img, t_cap)
                   + followers + platform + account                (the account)
                   + hour + weekday + drift                        (the time of posting)
    y       = f(post) + eps,   eps ~ N(0, sigma^2)          (the log1p scale)
    final   = max(0, round(expm1(y)))                       (heavy-tailed counts)
    comments ~ Binomial(final, COMMENT_SHARE), likes = final - comments

``hour`` and ``weekday`` are those of the local time in ``DEMO_TIMEZONE`` (daylight saving
included), the audience's zone: a model must convert ``posted_at`` (UTC) to see them.
``drift`` is linear in the years since the middle of the span (engagement falls slowly).

**Unfinished counts.** The export counts likes "so far": a post younger than
``LABEL_FINAL_DAYS`` at ``AS_OF`` shows only a fraction of its final likes and comments
(``maturity``, each count thinned binomially). ``engagement`` is the sum of what the
export shows. ``preprocess.py --as-of AS_OF --min-label-age-days LABEL_FINAL_DAYS`` drops
exactly those posts (``meta.json["preprocess_flags"]``).

Brightness and colourfulness are *measured* on the rendered image (mean luma and mean
HSV saturation of a small thumbnail), so the signal is what a 224 px model sees.
Sentiment is ``prepare.sentiment(raw_caption)["compound"]``, the pipeline's own feature.
``agreement`` is an interaction: a bonus when the caption's topic is the image's topic,
a penalty when it names another topic, 0 without a caption topic. Caption and image
topics are drawn so that neither alone predicts agreement, so a linear model on
concatenated frozen image/text embeddings cannot fit it, while an MLP on both (or a
fine-tuned model) can.

R² ceilings (log1p scale), all on the posts whose counts are final (the rows a run with the
maturity filter keeps): ``r2_ceiling_theoretical`` is ``Var(f) / (Var(f) + sigma^2)``;
``r2_ceiling_empirical`` the R² of predicting ``log1p(engagement)`` with f (rounding to
counts costs a little); ``r2_ceiling_observed`` the same when an empty platform cell's term
is replaced by its mean (all a model can know); ``r2_ceiling_new_accounts`` also without the
account effect (what a model can do for an account it never saw: a ``group:account_id``
split); ``r2_ceiling_without_features`` the best a model that ignores every column but the
image and caption can do (f_content plus the mean of the other terms, which are drawn
independently of the content). ``r2_ceiling_all_rows`` is the empirical ceiling when the
unfinished posts are kept: what they cost.

Every post is generated from its own ``numpy`` Generator seeded by ``(seed, index)``, and
every account from one seeded by ``(seed, ACCOUNT_STREAM, account)``, so the output is
byte-for-byte the same for a seed whatever ``--workers`` is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance

from common.config import bar_disabled, config_dict, field, parse_config, setup_logging, write_json_atomic
from data_preprocessing.prepare import HASHTAG_RE, sentiment

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "3"  # 3: an export: ids, posted_at, likes/comments/reach, time and account terms
JPEG_QUALITY = 90  # fixed, with no EXIF and no optimiser pass, so bytes depend on pixels only
MIN_SIDE, MAX_SIDE = 320, 1280
THUMB = 64  # side of the square thumbnail brightness/colourfulness are measured on
TOPICS = ("beach", "food", "pets", "city", "forest", "fitness")
POSTS_CSV, META_JSON, TRUTH_CSV, IMAGES_DIR = "posts.csv", "meta.json", "truth.csv", "images"
POST_COLUMNS = ("post_id", "account_id", "posted_at", "image_path", "description", "engagement", "likes",
                "comments", "followers", "platform", "reach")
OUTCOME_COLUMNS = ("likes", "comments", "reach")  # counted after posting, like the label: never inputs
# LabelLaw terms that come from the table's other columns, not from the image or caption
FEATURE_TERMS = ("followers", "platform", "account", "hour", "weekday", "drift")
# The export: posts span ~18 months before AS_OF; the audience (and the label law) lives in
# DEMO_TIMEZONE, whose daylight saving moves a UTC hour's local hour twice a year.
AS_OF = datetime(2025, 6, 30, 12, 0, tzinfo=timezone.utc)
SPAN_DAYS = 548
DEMO_TIMEZONE = "America/New_York"
LABEL_FINAL_DAYS = 7  # counts still grow until a post is this many days old
MATURITY_AT_0 = 0.3  # the share of its final counts a brand-new post shows; linear up to 1 at LABEL_FINAL_DAYS
POSTS_PER_ACCOUNT = 10
COMMENT_SHARE = 0.05  # the share of engagement that is comments
REACH_PER_ENGAGEMENT = 12.0  # reach ~ this * engagement, log-normal scatter REACH_SD
REACH_SD = 0.3
ACCOUNT_STREAM = 2 ** 32  # accounts' seed streams: spawn_key (ACCOUNT_STREAM, k), apart from posts' (index,)


# ---------------------------------------------------------------------------------------
# The label law
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelLaw:
    """Coefficients of f (log1p scale). Changing any value needs a GENERATOR_VERSION bump."""

    base: float = 3.4
    # Main effect of what the image shows: pets and beaches do well, forests and cities less.
    image_topic: tuple = (("beach", 0.6), ("food", 0.2), ("pets", 1.0),
                          ("city", -0.4), ("forest", -0.7), ("fitness", 0.0))
    # Mean luma of the thumbnail in [0, 1]; effect = coef * (value - center).
    brightness_coef: float = 3.0
    brightness_center: float = 0.40
    # Mean HSV saturation of the thumbnail in [0, 1].
    colourfulness_coef: float = 2.5
    colourfulness_center: float = 0.30
    # Salient objects: more is better up to a cap (clutter adds nothing).
    objects_coef: float = 0.15
    objects_cap: int = 3
    # Main effect of the caption's topic words (0 for no topic).
    caption_topic: tuple = (("beach", 0.2), ("food", 0.3), ("pets", 0.2),
                            ("city", 0.0), ("forest", -0.1), ("fitness", 0.3))
    hashtags_coef: float = 0.35  # * log1p(number of hashtags)
    cta_coef: float = 0.3  # call to action present ("Link in bio", "Tag a friend", ...)
    length_coef: float = 0.4  # * min(words, length_cap) / length_cap
    length_cap: int = 15
    sentiment_coef: float = 0.9  # * VADER compound of the raw caption, in [-1, 1]
    agree_bonus: float = 0.8  # caption topic == image topic
    mismatch_penalty: float = 0.8  # caption names another topic (subtracted)
    # The account: likes scale with followers (a power law, i.e. linear in log followers),
    # then the platform's audience habits, then what else makes an account do well (its
    # own effect, N(0, account_sd), the same for all its posts).
    followers_coef: float = 0.9  # * (log1p(followers) - followers_center)
    followers_center: float = 8.0
    platform: tuple = (("instagram", 0.3), ("tiktok", 0.5), ("facebook", -0.3), ("x", -0.6))
    account_sd: float = 0.3
    # The time of posting, in the audience's local time: an evening peak, a weekend peak,
    # and a slow decline over the months (engagement rates fall as feeds fill up).
    hour_amp: float = 0.6  # * cos(2 pi (local hour - hour_peak) / 24), hour with minutes
    hour_peak: float = 19.0
    weekday_amp: float = 0.35  # * cos(2 pi (weekday - weekday_peak) / 7), Monday = 0
    weekday_peak: float = 5.0  # Saturday
    drift_per_year: float = -0.3  # * years since the middle of the span
    sigma: float = 0.7  # sd of the Gaussian noise on the log1p scale

    def terms(self, a: dict) -> dict[str, float]:
        """Each additive term of f for one post's attributes ``a`` (see ``_make_post``)."""
        cap = a["caption_topic"]
        if cap == "":
            agreement = 0.0
        elif cap == a["image_topic"]:
            agreement = self.agree_bonus
        else:
            agreement = -self.mismatch_penalty
        return {
            "base": self.base,
            "image_topic": dict(self.image_topic)[a["image_topic"]],
            "brightness": self.brightness_coef * (a["brightness"] - self.brightness_center),
            "colourfulness": self.colourfulness_coef * (a["colourfulness"] - self.colourfulness_center),
            "objects": self.objects_coef * min(a["n_objects"], self.objects_cap),
            "caption_topic": dict(self.caption_topic).get(cap, 0.0),
            "hashtags": self.hashtags_coef * math.log1p(a["n_hashtags"]),
            "cta": self.cta_coef * a["cta"],
            "length": self.length_coef * min(a["n_words"], self.length_cap) / self.length_cap,
            "sentiment": self.sentiment_coef * a["sentiment"],
            "agreement": agreement,
            "followers": self.followers_coef * (math.log1p(a["followers"]) - self.followers_center),
            "platform": dict(self.platform)[a["platform"]],
            "account": a["account_effect"],
            "hour": self.hour_amp * math.cos(2 * math.pi * (a["local_hour"] - self.hour_peak) / 24),
            "weekday": self.weekday_amp * math.cos(2 * math.pi * (a["weekday"] - self.weekday_peak) / 7),
            "drift": self.drift_per_year * a["years"],
        }

    def content_f(self, a: dict) -> float:
        """f without the terms of the table's other columns: all the image and caption explain."""
        return float(sum(v for k, v in self.terms(a).items() if k not in FEATURE_TERMS))

    def f(self, a: dict) -> float:
        return float(sum(self.terms(a).values()))


LAW = LabelLaw()


def label_function_doc(law: LabelLaw = LAW) -> str:
    """The label law as a Markdown table, rendered from the coefficients themselves."""
    rows = [
        ("base", "1", f"{law.base:+.2f}"),
        ("image topic", "one of " + ", ".join(TOPICS),
         ", ".join(f"{t} {v:+.2f}" for t, v in law.image_topic)),
        ("brightness", f"mean luma of a {THUMB}px thumbnail, [0,1]",
         f"{law.brightness_coef:+.2f} * (x - {law.brightness_center:.2f})"),
        ("colourfulness", "mean HSV saturation of the thumbnail, [0,1]",
         f"{law.colourfulness_coef:+.2f} * (x - {law.colourfulness_center:.2f})"),
        ("objects", "number of salient objects drawn (1-5)",
         f"{law.objects_coef:+.2f} * min(x, {law.objects_cap})"),
        ("caption topic", "topic the caption's words name, or none",
         ", ".join(f"{t} {v:+.2f}" for t, v in law.caption_topic) + ", none +0.00"),
        ("hashtags", "number of #hashtags in the raw caption", f"{law.hashtags_coef:+.2f} * log1p(x)"),
        ("call to action", "caption has a CTA (0/1)", f"{law.cta_coef:+.2f} * x"),
        ("length", "whitespace words in the raw caption",
         f"{law.length_coef:+.2f} * min(x, {law.length_cap}) / {law.length_cap}"),
        ("sentiment", "prepare.sentiment(raw)['compound'], [-1,1]", f"{law.sentiment_coef:+.2f} * x"),
        ("agreement", "caption topic vs image topic",
         f"same {law.agree_bonus:+.2f}, other {-law.mismatch_penalty:+.2f}, none +0.00"),
        ("followers", "the account's follower count (column followers)",
         f"{law.followers_coef:+.2f} * (log1p(x) - {law.followers_center:.1f})"),
        ("platform", "the account's platform (column platform, empty in some rows)",
         ", ".join(f"{p} {v:+.2f}" for p, v in law.platform)),
        ("account", "the account (column account_id), the same for all its posts",
         f"N(0, {law.account_sd:.2f}^2) per account"),
        ("hour", f"local hour of posted_at in {DEMO_TIMEZONE}, with minutes",
         f"{law.hour_amp:+.2f} * cos(2 pi (x - {law.hour_peak:g}) / 24)"),
        ("weekday", f"local day of week of posted_at in {DEMO_TIMEZONE}, Monday = 0",
         f"{law.weekday_amp:+.2f} * cos(2 pi (x - {law.weekday_peak:g}) / 7)"),
        ("drift", "years from the middle of the span to posted_at", f"{law.drift_per_year:+.2f} * x"),
        ("noise", "eps ~ N(0, sigma^2) on log1p scale", f"sigma = {law.sigma:.2f}"),
    ]
    lines = ["| term | input | contribution to log1p(engagement) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    lines.append("final engagement = max(0, round(expm1(f + eps))) = likes + comments; posts younger than "
                 f"{LABEL_FINAL_DAYS} days at the export show only part of it")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Images: one painter per topic, then global exposure, colour, blur and grain
# ---------------------------------------------------------------------------------------


def _jit(rng, rgb, amount=18):
    """``rgb`` with each channel moved by up to ``amount``: no two posts share a palette."""
    return tuple(min(255, max(0, c + int(rng.integers(-amount, amount + 1)))) for c in rgb)


def _vgradient(size, stops):
    """A vertical gradient image; ``stops`` = [(position in [0, 1], (r, g, b)), ...]."""
    w, h = size
    pos = np.array([p for p, _ in stops], dtype=np.float64)
    cols = np.array([c for _, c in stops], dtype=np.float64)
    t = np.linspace(0.0, 1.0, max(h, 1))
    col = np.stack([np.interp(t, pos, cols[:, k]) for k in range(3)], axis=1)  # (H, 3)
    strip = Image.fromarray(np.round(col).astype(np.uint8)[:, None, :])  # (H, 1, 3)
    # Widening a 1 px column with NEAREST is a C-speed broadcast.
    return strip.resize((w, max(h, 1)), Image.Resampling.NEAREST)


def _ellipse(d, cx, cy, rx, ry, fill, outline=None, width=1):
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline, width=width)


def _paint_beach(rng, w, h, n_obj):
    u = min(w, h)
    sunset = rng.random() < 0.5
    hz = int(h * rng.uniform(0.40, 0.55))  # horizon
    shore = int(hz + (h - hz) * rng.uniform(0.35, 0.55))
    img = Image.new("RGB", (w, h))
    if sunset:
        sky = [(0, _jit(rng, (70, 40, 110))), (0.6, _jit(rng, (240, 110, 70))), (1, _jit(rng, (255, 200, 90)))]
        sea = [(0, _jit(rng, (120, 70, 110))), (1, _jit(rng, (40, 60, 110)))]
    else:
        sky = [(0, _jit(rng, (40, 110, 210))), (1, _jit(rng, (175, 215, 245)))]
        sea = [(0, _jit(rng, (20, 80, 150))), (1, _jit(rng, (40, 170, 180)))]
    img.paste(_vgradient((w, hz), sky), (0, 0))
    d = ImageDraw.Draw(img)
    r = u * rng.uniform(0.06, 0.12)
    sx = w * rng.uniform(0.2, 0.8)
    sy = hz - r * 0.3 if sunset else h * rng.uniform(0.08, 0.25)
    _ellipse(d, sx, sy, r, r, (255, 235, 160) if sunset else (255, 252, 225))
    img.paste(_vgradient((w, shore - hz), sea), (0, hz))  # the sea hides the lower sun
    img.paste(_vgradient((w, h - shore), [(0, _jit(rng, (235, 210, 160))), (1, _jit(rng, (205, 170, 115)))]),
              (0, shore))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):  # sun glitter / wave crests
        y = rng.uniform(hz + 2, shore - 2)
        x = rng.uniform(0, w)
        d.line([x, y, x + u * rng.uniform(0.05, 0.2), y], fill=(250, 240, 210), width=max(1, u // 200))
    d.line([0, shore, w, shore], fill=(250, 250, 245), width=max(2, u // 60))  # foam line
    for _ in range(n_obj):  # beach umbrellas on the sand
        s = u * rng.uniform(0.12, 0.2)
        bx, by = rng.uniform(0.1, 0.9) * w, rng.uniform(shore + 0.3 * (h - shore), h)
        d.line([bx, by, bx, by - 1.3 * s], fill=(90, 70, 50), width=max(2, u // 120))
        colour = [(230, 40, 40), (250, 200, 30), (30, 110, 220), (40, 180, 90)][int(rng.integers(4))]
        d.pieslice([bx - s, by - 1.7 * s, bx + s, by - 0.9 * s], 180, 360, fill=colour)
    return img


def _paint_food(rng, w, h, n_obj):
    u = min(w, h)
    img = Image.new("RGB", (w, h), _jit(rng, (150, 100, 60)))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.3:  # red-and-white tablecloth
        step = int(u * rng.uniform(0.06, 0.12))
        red = _jit(rng, (200, 40, 40))
        for y in range(0, h, step):
            for x in range(0, w, step):
                d.rectangle([x, y, x + step, y + step],
                            fill=red if ((x // step) + (y // step)) % 2 else (240, 235, 230))
    else:  # wooden table: grain lines
        y = 0.0
        while y < h:
            shade = int(rng.integers(-30, 30))
            base = img.getpixel((0, 0))
            d.line([0, y, w, y], fill=tuple(min(255, max(0, c + shade)) for c in base),
                   width=max(1, int(u * rng.uniform(0.003, 0.02))))
            y += u * rng.uniform(0.01, 0.05)
    for _ in range(n_obj):  # plates with a dish on each
        r = u * rng.uniform(0.16, 0.28) / math.sqrt(0.6 + 0.4 * n_obj)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _ellipse(d, cx, cy, r, r, (242, 242, 236), outline=(205, 205, 200), width=max(2, int(r * 0.06)))
        dish = int(rng.integers(3))
        if dish == 0:  # pizza
            _ellipse(d, cx, cy, 0.78 * r, 0.78 * r, (215, 160, 80))
            _ellipse(d, cx, cy, 0.66 * r, 0.66 * r, (205, 60, 40))
            for _ in range(7):
                a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.5 * r)
                _ellipse(d, cx + rr * math.cos(a), cy + rr * math.sin(a), 0.1 * r, 0.1 * r, (150, 30, 30))
        elif dish == 1:  # salad
            for _ in range(18):
                a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.6 * r)
                col = [(60, 160, 50), (110, 190, 60), (230, 60, 50), (250, 160, 40)][int(rng.integers(4))]
                _ellipse(d, cx + rr * math.cos(a), cy + rr * math.sin(a), 0.14 * r, 0.09 * r, col)
        else:  # pasta
            for _ in range(14):
                a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.5 * r)
                x0, y0 = cx + rr * math.cos(a), cy + rr * math.sin(a)
                d.arc([x0 - 0.2 * r, y0 - 0.2 * r, x0 + 0.2 * r, y0 + 0.2 * r], rng.uniform(0, 180),
                      rng.uniform(200, 360), fill=(245, 200, 80), width=max(2, int(r * 0.05)))
            _ellipse(d, cx, cy, 0.18 * r, 0.18 * r, (190, 40, 30))
    return img


def _paint_pets(rng, w, h, n_obj):
    u = min(w, h)
    floor_y = int(h * rng.uniform(0.55, 0.72))
    img = Image.new("RGB", (w, h))
    img.paste(_vgradient((w, floor_y), [(0, _jit(rng, (225, 215, 195), 30)), (1, _jit(rng, (200, 190, 175), 30))]))
    img.paste(_vgradient((w, h - floor_y), [(0, _jit(rng, (160, 115, 75))), (1, _jit(rng, (120, 80, 50)))]),
              (0, floor_y))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.6:  # a window on the wall
        wx, ww = rng.uniform(0.05, 0.6) * w, rng.uniform(0.2, 0.35) * w
        d.rectangle([wx, 0.1 * h, wx + ww, 0.1 * h + 0.7 * (floor_y - 0.1 * h)], fill=(190, 220, 245),
                    outline=(250, 250, 250), width=max(3, u // 60))
    _ellipse(d, w / 2, (floor_y + h) / 2, 0.4 * w, 0.12 * h, _jit(rng, (170, 60, 60), 40))  # rug
    furs = [(230, 140, 60), (95, 65, 40), (35, 35, 35), (240, 238, 230), (150, 150, 150), (205, 170, 110)]
    for _ in range(n_obj):
        s = u * rng.uniform(0.3, 0.42) / (1 + 0.35 * (n_obj - 1))
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(floor_y, h - 0.4 * s)
        fur = _jit(rng, furs[int(rng.integers(len(furs)))], 12)
        face = -1 if rng.random() < 0.5 else 1  # which side the head is on
        d.line([cx - face * 0.7 * s, cy, cx - face * 1.1 * s, cy - 0.5 * s], fill=fur, width=max(3, int(0.1 * s)))
        _ellipse(d, cx, cy, 0.75 * s, 0.42 * s, fur)  # body
        hx, hy, hr = cx + face * 0.6 * s, cy - 0.45 * s, 0.36 * s  # head
        for ex in (-0.7, 0.7):  # ears
            d.polygon([(hx + ex * hr, hy - 0.4 * hr), (hx + ex * 0.9 * hr, hy - 1.4 * hr),
                       (hx + ex * 0.2 * hr, hy - 0.85 * hr)], fill=fur)
        _ellipse(d, hx, hy, hr, hr, fur)
        for ex in (-0.38, 0.38):  # eyes with a highlight
            _ellipse(d, hx + ex * hr, hy - 0.1 * hr, 0.16 * hr, 0.18 * hr, (20, 20, 20))
            _ellipse(d, hx + ex * hr + 0.05 * hr, hy - 0.16 * hr, 0.05 * hr, 0.05 * hr, (255, 255, 255))
        d.polygon([(hx - 0.12 * hr, hy + 0.25 * hr), (hx + 0.12 * hr, hy + 0.25 * hr), (hx, hy + 0.4 * hr)],
                  fill=(60, 30, 30))
    return img


def _paint_city(rng, w, h, n_obj):
    u = min(w, h)
    night = rng.random() < 0.5
    ground = int(h * rng.uniform(0.78, 0.9))
    sky = ([(0, _jit(rng, (10, 15, 40))), (1, _jit(rng, (70, 55, 100)))] if night
           else [(0, _jit(rng, (90, 150, 215))), (1, _jit(rng, (205, 222, 235)))])
    img = _vgradient((w, h), sky)
    d = ImageDraw.Draw(img)
    for layer, (tone, hmax) in enumerate([((120, 130, 150), 0.65), ((70, 75, 90), 0.5)]):
        x = -u * 0.05
        while x < w:
            bw = u * rng.uniform(0.07, 0.16)
            top = ground - h * rng.uniform(0.15, hmax)
            body = _jit(rng, tone if not night else tuple(c // 2 for c in tone), 15)
            d.rectangle([x, top, x + bw, ground], fill=body)
            if layer == 1:  # windows on the near buildings only
                step = max(4, u * 0.035)
                for wy in np.arange(top + step * 0.6, ground - step, step):
                    for wx in np.arange(x + step * 0.4, x + bw - step * 0.6, step * 0.9):
                        lit = rng.random() < (0.55 if night else 0.3)
                        col = ((250, 215, 110) if lit else (30, 30, 40)) if night else \
                              ((185, 210, 235) if lit else (60, 70, 85))
                        d.rectangle([wx, wy, wx + step * 0.45, wy + step * 0.55], fill=col)
            x += bw + u * rng.uniform(0.0, 0.03)
    d.rectangle([0, ground, w, h], fill=_jit(rng, (55, 55, 60), 8))  # road
    for lx in np.arange(0, w, u * 0.12):
        d.rectangle([lx, (ground + h) / 2 - 2, lx + u * 0.06, (ground + h) / 2 + 2], fill=(235, 235, 220))
    for _ in range(n_obj):  # cars
        cw = u * rng.uniform(0.16, 0.24)
        cx, cy = rng.uniform(0, w - cw), rng.uniform(ground, h - 0.2 * cw)
        col = [(220, 30, 30), (250, 200, 20), (30, 90, 220), (240, 240, 240), (20, 20, 20)][int(rng.integers(5))]
        d.rectangle([cx + 0.2 * cw, cy - 0.45 * cw, cx + 0.75 * cw, cy - 0.2 * cw], fill=col)
        d.rectangle([cx, cy - 0.25 * cw, cx + cw, cy], fill=col)
        for wx in (0.22, 0.78):
            _ellipse(d, cx + wx * cw, cy, 0.11 * cw, 0.11 * cw, (15, 15, 15))
        if night:
            _ellipse(d, cx + cw, cy - 0.14 * cw, 0.05 * cw, 0.04 * cw, (255, 250, 200))
    return img


def _paint_forest(rng, w, h, n_obj):
    u = min(w, h)
    ground = int(h * rng.uniform(0.55, 0.7))
    img = _vgradient((w, h), [(0, _jit(rng, (150, 190, 225))), (0.6, _jit(rng, (215, 228, 225)))])
    d = ImageDraw.Draw(img)
    for k in range(int(rng.integers(2, 4))):  # mountain ranges, paler when further
        tone = _jit(rng, (110 + 25 * (2 - k), 130 + 20 * (2 - k), 150 + 15 * (2 - k)), 10)
        pts, x = [(0, ground)], 0.0
        while x < w:
            x += u * rng.uniform(0.15, 0.4)
            pts.append((x, ground - h * rng.uniform(0.12, 0.35) / (1 + 0.4 * k)))
        pts.append((w, ground))
        d.polygon(pts, fill=tone)
    img.paste(_vgradient((w, h - ground), [(0, _jit(rng, (70, 120, 50))), (1, _jit(rng, (40, 85, 35)))]),
              (0, ground))
    d = ImageDraw.Draw(img)
    greens = [(30, 90, 40), (45, 120, 55), (20, 70, 35), (60, 105, 45)]
    for _ in range(int(rng.integers(25, 50))):  # distant treeline
        tx, th = rng.uniform(0, w), u * rng.uniform(0.05, 0.12)
        d.polygon([(tx - 0.3 * th, ground + 2), (tx + 0.3 * th, ground + 2), (tx, ground - th)],
                  fill=greens[int(rng.integers(4))])
    for _ in range(n_obj):  # big foreground trees
        th = u * rng.uniform(0.35, 0.6)
        tx, ty = rng.uniform(0.05, 0.95) * w, rng.uniform(ground + 0.1 * (h - ground), h)
        d.rectangle([tx - 0.04 * th, ty - 0.35 * th, tx + 0.04 * th, ty], fill=(90, 60, 35))
        g = _jit(rng, greens[int(rng.integers(4))], 10)
        if rng.random() < 0.5:  # conifer: stacked triangles
            for k in range(3):
                yb = ty - 0.25 * th - k * 0.22 * th
                d.polygon([(tx - (0.3 - 0.07 * k) * th, yb), (tx + (0.3 - 0.07 * k) * th, yb),
                           (tx, yb - 0.4 * th)], fill=g)
        else:  # broadleaf: a cluster of circles
            for _ in range(5):
                _ellipse(d, tx + rng.uniform(-0.15, 0.15) * th, ty - rng.uniform(0.5, 0.75) * th,
                         0.18 * th, 0.16 * th, g)
    return img


def _paint_fitness(rng, w, h, n_obj):
    u = min(w, h)
    floor_y = int(h * rng.uniform(0.58, 0.72))
    img = Image.new("RGB", (w, h))
    img.paste(_vgradient((w, floor_y), [(0, _jit(rng, (55, 55, 62))), (1, _jit(rng, (95, 95, 100)))]))
    img.paste(_vgradient((w, h - floor_y), [(0, _jit(rng, (40, 40, 42), 6)), (1, _jit(rng, (22, 22, 24), 6))]),
              (0, floor_y))
    d = ImageDraw.Draw(img)
    neon = [(255, 40, 130), (0, 200, 255), (120, 255, 80), (255, 150, 0)][int(rng.integers(4))]
    sy = floor_y * rng.uniform(0.3, 0.6)
    d.rectangle([0, sy, w, sy + u * rng.uniform(0.03, 0.07)], fill=neon)  # neon stripe on the wall
    for rx in np.arange(rng.uniform(0, 0.2) * w, w, u * rng.uniform(0.25, 0.45)):  # rack uprights
        d.rectangle([rx, floor_y * 0.15, rx + u * 0.025, floor_y], fill=(150, 150, 155))
    for _ in range(int(rng.integers(40, 80))):  # rubber floor speckles
        x, y = rng.uniform(0, w), rng.uniform(floor_y, h)
        _ellipse(d, x, y, u * 0.004, u * 0.004, (70, 70, 72))
    for _ in range(n_obj):
        s = u * rng.uniform(0.26, 0.38) / math.sqrt(0.7 + 0.3 * n_obj)
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(floor_y + 0.3 * s, h - 0.3 * s)
        plate = [(25, 25, 25), (200, 30, 30), (30, 80, 200), (230, 190, 20)][int(rng.integers(4))]
        if rng.random() < 0.6:  # dumbbell: handle and two plates
            d.rectangle([cx - 0.6 * s, cy - 0.05 * s, cx + 0.6 * s, cy + 0.05 * s], fill=(190, 190, 195))
            for px in (-0.55, 0.4):
                d.rectangle([cx + px * s, cy - 0.32 * s, cx + (px + 0.15) * s, cy + 0.32 * s], fill=plate)
        else:  # kettlebell: round body and a handle
            d.arc([cx - 0.25 * s, cy - 0.75 * s, cx + 0.25 * s, cy - 0.2 * s], 180, 360, fill=plate,
                  width=max(3, int(0.08 * s)))
            _ellipse(d, cx, cy, 0.35 * s, 0.33 * s, plate)
    return img


_PAINTERS = {"beach": _paint_beach, "food": _paint_food, "pets": _paint_pets,
             "city": _paint_city, "forest": _paint_forest, "fitness": _paint_fitness}


def _image_size(rng) -> tuple[int, int]:
    """(W, H) with each side in [MIN_SIDE, MAX_SIDE] and a phone-like aspect ratio."""
    ratio = [1.0, 4 / 5, 3 / 4, 2 / 3, 9 / 16, 5 / 4, 4 / 3, 3 / 2, 16 / 9][int(rng.integers(9))]  # W / H
    long_side = int(rng.integers(560, MAX_SIDE + 1))
    w, h = (long_side, long_side / ratio) if ratio >= 1 else (long_side * ratio, long_side)
    return int(np.clip(round(w), MIN_SIDE, MAX_SIDE)), int(np.clip(round(h), MIN_SIDE, MAX_SIDE))


def render_image(rng, topic: str, n_objects: int, exposure: float, vividness: float) -> Image.Image:
    """Draw one post image: topic scene, then exposure, colour, optional vignette, grain.

    ``exposure`` and ``vividness`` in [0, 1] are the latent knobs; the label uses what is
    *measured* on the result (``measure_image``), since topics differ in base brightness.
    """
    w, h = _image_size(rng)
    if rng.random() < 0.5:
        img = _PAINTERS[topic](rng, w, h, n_objects)
    else:  # paint at half size and upsample: soft edges like a phone photo, and 4x cheaper
        img = _PAINTERS[topic](rng, (w + 1) // 2, (h + 1) // 2, n_objects)
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    gain = 0.35 + 1.2 * exposure  # exposure as a per-channel lookup table: cheaper than a blend
    img = img.point([min(255, int(i * gain + 0.5)) for i in range(256)] * 3)
    img = ImageEnhance.Color(img).enhance(0.05 + 1.7 * vividness)
    if rng.random() < 0.4:  # vignette: a radial mask at 32 px, smoothly upsampled
        yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
        mask = np.clip(255 * (1.25 - 0.55 * (xx ** 2 + yy ** 2)), 0, 255).astype(np.uint8)
        mask_img = Image.fromarray(mask).resize((w, h), Image.Resampling.BILINEAR)
        img = Image.composite(img, Image.new("RGB", (w, h)), mask_img)
    # Sensor grain: uniform noise in [-a, a] drawn at half resolution (4x cheaper) and
    # upsampled, so it looks like clumped grain; ImageChops adds and clips in C.
    a = int(rng.integers(3, 11))
    noise = rng.integers(128 - a, 129 + a, size=((h + 1) // 2, (w + 1) // 2, 3), dtype=np.uint8)
    grain = Image.fromarray(noise).resize((w, h), Image.Resampling.NEAREST)
    return ImageChops.add(img, grain, scale=1.0, offset=-128)


def measure_image(img: Image.Image) -> tuple[float, float]:
    """(brightness, colourfulness) in [0, 1]: mean luma and mean HSV saturation of a thumbnail."""
    thumb = img.resize((THUMB, THUMB), Image.Resampling.BILINEAR, reducing_gap=2.0)
    luma = np.asarray(thumb.convert("L"), dtype=np.float64).mean() / 255.0
    sat = np.asarray(thumb.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0
    return float(luma), float(sat)


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------

_TOPIC_PHRASES = {
    "beach": ["beach day", "sunset", "ocean view", "sun & sand", "golden hour at the beach", "beach vibes"],
    "food": ["brunch", "pizza night", "homemade pasta", "mac & cheese", "taco tuesday", "this salad"],
    "pets": ["puppy cuddles", "my dog", "our cat", "fur baby", "this kitten", "the good boy"],
    "city": ["city lights", "the skyline", "downtown", "rooftop view", "city life", "the subway"],
    "forest": ["forest hike", "the hiking trail", "mountain air", "nature walk", "the woods", "pine trees"],
    "fitness": ["leg day", "my workout", "gym session", "morning run", "a new PR", "deadlifts"],
}
_TOPIC_TAGS = {
    "beach": ["#BeachLife", "#SunsetLovers", "#TravelGoals", "#OceanView", "#SummerVibes", "#Wanderlust"],
    "food": ["#Foodie", "#FoodPorn", "#Yummy", "#InstaFood", "#HomeCooking", "#Brunch"],
    "pets": ["#DogsOfInstagram", "#CatsOfInstagram", "#PetLove", "#Puppy", "#FurBaby", "#Adorable"],
    "city": ["#CityLife", "#UrbanPhotography", "#Skyline", "#StreetPhotography", "#NYC", "#CityLights"],
    "forest": ["#NatureLovers", "#Hiking", "#ForestBathing", "#Outdoors", "#MountainViews", "#GetOutside"],
    "fitness": ["#FitFam", "#GymLife", "#LegDay", "#FitnessMotivation", "#Workout", "#NoExcuses"],
}
_TOPIC_EMOJI = {"beach": ["🌊", "🌅", "☀️", "🏖️"], "food": ["🍕", "🍝", "🥑", "😋"], "pets": ["🐶", "🐱", "🐾"],
                "city": ["🏙️", "🌃", "🚕"], "forest": ["🌲", "🏔️", "🍃"], "fitness": ["💪", "🏋️", "🏃"]}
_GENERIC_PHRASES = ["today", "the weekend", "life lately", "these vibes", "Monday", "this moment"]
_GENERIC_TAGS = ["#instagood", "#photooftheday", "#love", "#happy", "#tbt", "#picoftheday", "#mood",
                 "#weekend", "#blessed", "#nofilter", "#vibes", "#explore", "#instadaily"]
_OPENERS = {
    "pos": ["Absolutely LOVE {t}", "{t} made my day", "Best {t} EVER", "So grateful for {t}",
            "Can't get enough of {t}", "obsessed with {t}", "{t} = pure happiness", "Loving {t} so much"],
    "neu": ["{t} today", "Some {t} from last week", "Throwback to {t}", "{t}, round two",
            "Posting {t} before I forget", "Here is {t}", "{t} on a Tuesday"],
    "neg": ["Ugh, {t} was a total disappointment", "Not gonna lie, {t} was awful", "Worst {t} ever",
            "{t} ruined by the rain", "Honestly hate how {t} turned out", "So tired of {t}", "{t}... sad and boring"],
}
_EMOJI = {"pos": ["😍", "❤️", "🔥", "✨", "🙌", "😊", "💯"], "neu": ["📸", "🤷", "👀"],
          "neg": ["😡", "😢", "🙄", "😤", "💔", "😞"]}
_ENDINGS = {"pos": ["!", "!!", "!!!", "", "."], "neu": [".", "", "", "?"], "neg": [".", "!", "...", ""]}
_FILLERS = ["Can't believe the week is over.", "Swipe for more", "Who else is ready for the weekend?",
            "Still thinking about it.", "Shot on my phone, no filter.", "Dream team & good times.",
            "Sunday reset.", "More soon", "Details in the comments", "Not sponsored, just sharing"]
_HANDLES = ["@jess_travels", "@mike.k", "@the_foodie_files", "@urbanlens", "@sam_rivera", "@fitwithkate",
            "@paws_and_claws", "@wanderlust.co", "@DanielleR", "@chef_marco"]
_MENTIONS = ["with {m}", "📸 {m}", "thanks {m}!", "cc {m}", "w/ {m} &amp; {m2}"]
_URLS = ["https://bit.ly/3xYzAb", "http://www.myblog.com/post/1234", "www.shop.example.com/summer",
         "https://linktr.ee/janedoe", "https://youtu.be/dQw4w9WgXcQ"]
_URL_LINES = ["More at {u}", "{u}", "Shop the look: {u}", "Full story -> {u}"]
_CTAS = ["Link in bio!", "Tag a friend who needs this 👇", "Double tap if you agree ❤️", "Comment below ⬇️",
         "Follow for more!", "Save this for later"]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def make_caption(rng, topic: str) -> tuple[str, dict]:
    """A raw caption naming ``topic`` ("" = no topic words). Returns (caption, {cta})."""
    mood = _pick(rng, ["pos"] * 5 + ["neu"] * 3 + ["neg"] * 2)
    phrase = _pick(rng, _TOPIC_PHRASES[topic]) if topic else _pick(rng, _GENERIC_PHRASES)
    opener = _pick(rng, _OPENERS[mood]).format(t=phrase)
    opener = opener[0].upper() + opener[1:] if rng.random() < 0.7 else opener
    parts = [opener + _pick(rng, _ENDINGS[mood])]
    emoji = []
    if rng.random() < 0.6:
        emoji.append(_pick(rng, _EMOJI[mood]))
    if topic and rng.random() < 0.5:
        emoji.append(_pick(rng, _TOPIC_EMOJI[topic]))
    if emoji:
        parts[0] += " " + "".join(emoji * (2 if rng.random() < 0.15 else 1))
    if rng.random() < 0.45:
        parts.append(_pick(rng, _FILLERS))
    if rng.random() < 0.25:
        m, m2 = rng.choice(_HANDLES, size=2, replace=False)
        parts.append(_pick(rng, _MENTIONS).format(m=m, m2=m2))
    if rng.random() < 0.15:
        parts.append(_pick(rng, _URL_LINES).format(u=_pick(rng, _URLS)))
    cta = int(rng.random() < 0.3)
    if cta:
        parts.append(_pick(rng, _CTAS))
    # Hashtags: none for a quarter of posts, else a skewed count, mostly on-topic.
    n_tags = 0 if rng.random() < 0.25 else int(min(15, 1 + rng.geometric(0.25)))
    on_topic, generic = (list(_TOPIC_TAGS[topic]) if topic else []), list(_GENERIC_TAGS)
    tags = []
    for _ in range(n_tags):  # drawn without replacement; a pool that runs dry gives way
        src = on_topic if on_topic and (rng.random() < 0.6 or not generic) else generic
        if not src:
            break
        tag = src.pop(int(rng.integers(len(src))))
        tags.append(tag.lower() if rng.random() < 0.25 else tag)
    text = " ".join(parts)
    if rng.random() < 0.5:
        text = text.replace("&amp;", "&").replace("&", "&amp;")  # as scraped: HTML-escaped ampersands
    if rng.random() < 0.1:
        text = text.lower()
    elif rng.random() < 0.15:  # one SHOUTED word
        words = text.split(" ")
        k = int(rng.integers(len(words)))
        words[k] = words[k].upper()
        text = " ".join(words)
    if tags:
        sep = _pick(rng, [" ", " ", "\n\n", "\n.\n.\n.\n"])  # Instagram-style hashtag block
        text = text + sep + " ".join(tags)
    return text, {"cta": cta}


# ---------------------------------------------------------------------------------------
# One post, and the dataset
# ---------------------------------------------------------------------------------------

P_EMPTY, P_MATCH, P_OTHER = 0.04, 0.55, 0.30  # the rest of the captions name no topic
# Accounts: followers ~ log-normal (median ~3,000, a heavy tail into the millions); a
# scrape sometimes leaves a post's platform cell empty.
FOLLOWERS_LOG_MEAN, FOLLOWERS_LOG_SD = 8.0, 1.3
PLATFORM_PROBS = (0.45, 0.30, 0.15, 0.10)  # in LabelLaw.platform's order
P_MISSING_PLATFORM = 0.03
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S+0000"  # what Instagram's Graph API writes


def _post_rng(seed: int, index: int) -> np.random.Generator:
    # spawn_key gives each post an independent stream that depends only on (seed, index).
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def n_accounts_for(n: int) -> int:
    return max(1, math.ceil(n / POSTS_PER_ACCOUNT))


def account(seed: int, k: int) -> dict:
    """Account ``k``'s id, followers, platform and effect: from its own stream, so every post
    of it (in any worker) sees the same account."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ACCOUNT_STREAM, k)))
    platforms = [p for p, _ in LAW.platform]
    return {
        "account_id": f"acct_{k:04d}",
        "followers": int(round(math.exp(rng.normal(FOLLOWERS_LOG_MEAN, FOLLOWERS_LOG_SD)))),
        "platform": platforms[int(rng.choice(len(platforms), p=PLATFORM_PROBS))],
        "account_effect": float(rng.normal(0.0, LAW.account_sd)),
    }


def posting_time(u: float) -> dict:
    """The post's time from a uniform draw ``u``: UTC instant (whole seconds), its local hour
    and weekday in DEMO_TIMEZONE, years from the middle of the span, and age at AS_OF."""
    posted = AS_OF - timedelta(seconds=round(u * SPAN_DAYS * 86400))
    local = posted.astimezone(ZoneInfo(DEMO_TIMEZONE))
    age_days = (AS_OF - posted).total_seconds() / 86400
    return {"posted_at": posted.strftime(TIME_FORMAT),
            "local_hour": local.hour + local.minute / 60 + local.second / 3600, "weekday": local.weekday(),
            "years": (SPAN_DAYS / 2 - age_days) / 365.25, "age_days": age_days,
            "maturity": min(1.0, MATURITY_AT_0 + (1 - MATURITY_AT_0) * age_days / LABEL_FINAL_DAYS)}


def _make_post(args: tuple[int, int, str, int]) -> dict:
    """Generate post ``index``: write its JPEG under ``images_dir``, return its truth row."""
    seed, index, images_dir, n_accounts = args
    rng = _post_rng(seed, index)
    # 1. image: topic and latent knobs, then the measured visual attributes
    t_img = TOPICS[int(rng.integers(len(TOPICS)))]
    n_objects = int(rng.integers(1, 6))
    img = render_image(rng, t_img, n_objects, float(rng.random()), float(rng.random()))
    brightness, colourfulness = measure_image(img)
    rel_path = f"{IMAGES_DIR}/{index:06d}.jpg"
    img.save(Path(images_dir) / f"{index:06d}.jpg", format="JPEG", quality=JPEG_QUALITY,
             optimize=False, progressive=False, subsampling=2)
    # 2. caption: agrees with the image, names another topic, names none, or is empty
    u = rng.random()
    if u < P_EMPTY:
        t_cap, caption, extra = "", "", {"cta": 0}
    else:
        if u < P_EMPTY + P_MATCH:
            t_cap = t_img
        elif u < P_EMPTY + P_MATCH + P_OTHER:
            t_cap = _pick(rng, [t for t in TOPICS if t != t_img])
        else:
            t_cap = ""
        caption, extra = make_caption(rng, t_cap)
    a = {
        "post_id": f"post_{index:06d}", "image_path": rel_path, "image_topic": t_img, "caption_topic": t_cap,
        "width": img.width, "height": img.height, "n_objects": n_objects,
        "brightness": brightness, "colourfulness": colourfulness,
        "n_hashtags": len(HASHTAG_RE.findall(caption)), "cta": extra["cta"],
        "n_words": len(caption.split()), "sentiment": sentiment(caption)["compound"],
    }
    # 3. label: the law plus noise, drawn after the content so it never shifts its streams;
    # then who posted it and when, and the counts the export shows
    eps = float(rng.normal(0.0, LAW.sigma))
    a.update(account(seed, int(rng.integers(n_accounts))))
    a["platform_missing"] = bool(rng.random() < P_MISSING_PLATFORM)
    a.update(posting_time(float(rng.random())))
    a["f"] = LAW.f(a)
    a["f_content"] = LAW.content_f(a)
    a["y"] = a["f"] + eps
    a.update(_counts(rng, a["y"], a["maturity"]))
    a["description"] = caption
    return a


def _counts(rng, y: float, maturity: float) -> dict:
    """Final engagement from y, split into likes and comments; reach; and what the export
    shows: each count thinned to ``maturity`` (1 for a post old enough)."""
    final = max(0, int(round(math.expm1(y))))
    comments_final = int(rng.binomial(final, COMMENT_SHARE))
    reach_final = max(final, int(round(math.expm1(y + math.log(REACH_PER_ENGAGEMENT) + rng.normal(0.0, REACH_SD)))))
    likes, comments, reach = (int(rng.binomial(c, maturity)) for c in (final - comments_final, comments_final,
                                                                       reach_final))
    return {"engagement_final": final, "likes": likes, "comments": comments, "engagement": likes + comments,
            "reach": reach}


def _observed_f(df) -> np.ndarray:
    """The best prediction from what the table shows: a missing platform cell's term is its mean."""
    term = np.array([dict(LAW.platform)[p] for p in df["platform"]])
    mean_platform = float(np.dot(PLATFORM_PROBS, [v for _, v in LAW.platform]))
    f = df["f"].to_numpy().copy()
    miss = df["platform_missing"].to_numpy()
    f[miss] += mean_platform - term[miss]
    return f


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


TRUTH_COLUMNS = ("post_id", "account_id", "image_path", "image_topic", "caption_topic", "width", "height",
                 "n_objects", "brightness", "colourfulness", "n_hashtags", "cta", "n_words", "sentiment",
                 "followers", "platform", "platform_missing", "account_effect", "posted_at", "local_hour", "weekday",
                 "years", "age_days", "maturity", "f", "f_content", "y", "engagement_final", "engagement")


def make_posts(out_dir: str | os.PathLike, n: int = 2000, seed: int = 0, workers: int = 0,
               progress: bool = True, overwrite: bool = False) -> dict:
    """Write ``posts.csv``, ``images/``, ``truth.csv`` and ``meta.json`` under ``out_dir``.

    ``workers=0`` uses every core; the output does not depend on it. Refuses a directory
    that already holds images unless ``overwrite`` (then only our own files are replaced).
    Returns the meta dict that was written.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    out = Path(out_dir)
    images = out / IMAGES_DIR
    stale = sorted(images.glob("*.jpg")) if images.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(f"{images} already holds {len(stale)} images; pass overwrite=True")
    for p in stale:  # a smaller n must not leave images from an earlier, larger run
        p.unlink()
    images.mkdir(parents=True, exist_ok=True)

    # 1. generate posts in parallel; imap keeps index order, so rows never depend on workers
    workers = workers or os.cpu_count() or 1
    jobs = [(seed, i, str(images), n_accounts_for(n)) for i in range(n)]
    bar = dict(total=n, desc="posts", unit="post", disable=bar_disabled(progress))
    if workers == 1 or n < 8:
        rows = [_make_post(j) for j in tqdm(jobs, **bar)]
    else:
        # spawn, not fork: callers (tests, notebooks) may already hold torch/BLAS threads.
        with mp.get_context("spawn").Pool(min(workers, n)) as pool:
            rows = list(tqdm(pool.imap(_make_post, jobs, chunksize=8), **bar))

    # 2. posts.csv holds only what a real export would; truth.csv holds the latents
    df = pd.DataFrame(rows)
    table = df[list(POST_COLUMNS)].astype(object)
    table.loc[df["platform_missing"], "platform"] = ""  # what a scrape leaves empty
    table.to_csv(out / POSTS_CSV, index=False, lineterminator="\n")
    df[list(TRUTH_COLUMNS)].to_csv(out / TRUTH_CSV, index=False, lineterminator="\n")  # floats at full repr

    # 3. ceilings on the log1p scale and label statistics
    meta = ceilings_meta(df, n, seed)
    write_json_atomic(out / META_JSON, meta)
    return meta


def preprocess_flags() -> list[str]:
    """The preprocess.py flags this table is meant to be read with."""
    return ["--numeric-cols", "followers:0:", "--categorical-cols", "platform", "--datetime-cols", "posted_at",
            "--timezone", DEMO_TIMEZONE, "--split", "time:posted_at", "--as-of", AS_OF.isoformat(),
            "--min-label-age-days", str(LABEL_FINAL_DAYS)]


def _ceilings(df) -> dict:
    """The R² ceilings of the module docstring on the rows of ``df`` (log1p scale)."""
    f, f_content = df["f"].to_numpy(), df["f_content"].to_numpy()
    y = np.log1p(df["engagement"].to_numpy())
    var_f = float(np.var(f))
    ok = len(df) > 1
    observed = _observed_f(df)
    return {
        "r2_ceiling_theoretical": var_f / (var_f + LAW.sigma ** 2),
        "r2_ceiling_empirical": _r2(y, f) if ok else float("nan"),
        # What the table shows: an empty platform cell hides its term.
        "r2_ceiling_observed": _r2(y, observed) if ok else float("nan"),
        # An account never seen: its effect (mean 0) is unknown too.
        "r2_ceiling_new_accounts": _r2(y, observed - df["account_effect"].to_numpy()) if ok else float("nan"),
        "r2_ceiling_without_features_theoretical": float(np.var(f_content)) / (var_f + LAW.sigma ** 2),
        "r2_ceiling_without_features": _r2(y, f_content + float(np.mean(f - f_content))) if ok else float("nan"),
    }


def ceilings_meta(df, n: int, seed: int) -> dict:
    """meta.json: the generator's settings, the export, the R² ceilings, label stats."""
    final = df["age_days"].to_numpy() >= LABEL_FINAL_DAYS
    likes = df.loc[final, "engagement"].to_numpy()
    ceilings = _ceilings(df[final])
    return {
        "n": n,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "files": {"posts": POSTS_CSV, "images": IMAGES_DIR, "truth": TRUTH_CSV},
        "columns": list(POST_COLUMNS),
        "feature_columns": {"numeric": ["followers"], "categorical": ["platform"], "datetime": ["posted_at"]},
        "outcome_columns": list(OUTCOME_COLUMNS),
        "label": {"column": "engagement", "is": "likes + comments"},
        "as_of": AS_OF.isoformat(),
        "timezone": DEMO_TIMEZONE,
        "span_days": SPAN_DAYS,
        "label_final_after_days": LABEL_FINAL_DAYS,
        "n_accounts": n_accounts_for(n),
        "n_unfinished": int((~final).sum()),
        "preprocess_flags": preprocess_flags(),
        "topics": list(TOPICS),
        "caption_topic_probs": {"empty": P_EMPTY, "same_as_image": P_MATCH, "other_topic": P_OTHER,
                                "no_topic": round(1 - P_EMPTY - P_MATCH - P_OTHER, 10)},
        "image": {"min_side": MIN_SIDE, "max_side": MAX_SIDE, "format": "JPEG", "jpeg_quality": JPEG_QUALITY},
        "coefficients": {k: (dict(v) if isinstance(v, tuple) else v)
                         for k, v in dataclasses.asdict(LAW).items()},
        "sigma": LAW.sigma,
        "var_f": float(np.var(df.loc[final, "f"])),
        "ceiling_rows": f"the {int(final.sum())} posts at least {LABEL_FINAL_DAYS} days old at as_of",
        **ceilings,
        # the same empirical ceiling with the unfinished posts kept: what they cost
        "r2_ceiling_all_rows": (_r2(np.log1p(df["engagement"].to_numpy()), df["f"].to_numpy()) if n > 1
                                else float("nan")),
        "label_stats": {
            "min": int(likes.min()), "median": float(np.median(likes)), "mean": float(likes.mean()),
            "p90": float(np.percentile(likes, 90)), "p99": float(np.percentile(likes, 99)),
            "max": int(likes.max()), "frac_zero": float(np.mean(likes == 0)),
            "log1p_mean": float(np.log1p(likes).mean()), "log1p_std": float(np.log1p(likes).std()),
            "log1p_p01": float(np.percentile(np.log1p(likes), 1)),
            "log1p_p99": float(np.percentile(np.log1p(likes), 99)),
        } if likes.size else {},
        "label_function_doc": label_function_doc(),
    }


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


@dataclass
class DemoDataConfig:
    """Generate a synthetic posts dataset (posts.csv + images/ + meta.json) with a known label law."""

    out: str = field(help="output directory (posts.csv, images/, meta.json, truth.csv)")
    n: int = field(2000, help="number of posts")
    seed: int = field(0, help="random seed; output is byte-identical for a seed")
    workers: int = field(0, help="worker processes (0 = all cores); does not change the output")
    overwrite: bool = field(False, help="replace images already in OUT/images")
    progress: bool = field(True, help="show a tqdm progress bar")

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")


def main(argv=None) -> dict:
    # 1. parse args
    cfg = parse_config(DemoDataConfig, argv)
    setup_logging()
    logger.info("config: %s", config_dict(cfg))
    # 2. generate
    meta = make_posts(cfg.out, n=cfg.n, seed=cfg.seed, workers=cfg.workers, progress=cfg.progress,
                      overwrite=cfg.overwrite)
    # 3. report: the ceiling any model can reach on this data
    logger.info("label stats: %s", meta["label_stats"])
    print(f"best achievable R^2 (log1p scale, {meta['ceiling_rows']}): theoretical "
          f"{meta['r2_ceiling_theoretical']:.4f}, empirical {meta['r2_ceiling_empirical']:.4f}, from the table's "
          f"cells {meta['r2_ceiling_observed']:.4f}, for accounts never seen {meta['r2_ceiling_new_accounts']:.4f}; "
          f"ignoring every column but image and caption {meta['r2_ceiling_without_features']:.4f}; with the "
          f"{meta['n_unfinished']} unfinished posts kept {meta['r2_ceiling_all_rows']:.4f} (n={cfg.n}, "
          f"sigma={LAW.sigma})")
    print(f"export time {meta['as_of']}, audience zone {meta['timezone']}; preprocess with: "
          + " ".join(meta["preprocess_flags"]))
    return meta


if __name__ == "__main__":
    main()
