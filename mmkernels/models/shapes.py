"""Shapes: an offline image–text data set of coloured shapes (Sort-of-CLEVR, arXiv 1706.01427).

Everything is generated with numpy at run time from a seed; nothing is downloaded. A scene puts 1
to 3 objects into distinct quadrants of a dark RGB image. An object has one of 6 colours, 4 shapes
and 2 sizes, and sits in its quadrant with a small random jitter. Each scene comes with

- a caption from a small grammar that names every object and fixes its quadrant, so the caption
  determines the scene up to jitter and noise (``parse_caption`` inverts it):

  - 1 object:  "a large purple square in the top left"
  - 2 objects, same row / column / diagonal:
    "a large red circle left of a small blue square at the bottom",
    "a small green triangle above a large white cross on the right",
    "a small red cross above and left of a large blue circle";
  - 3 objects: the object diagonally opposite the empty quadrant touches the other two, so it is
    named first, with one horizontal and one vertical relation:
    "a small red circle left of a large blue square and above a small green cross".

- questions with one-word answers, of four types (``QUESTION_TYPES``): colour ("what colour is
  the circle?"), shape ("what shape is the blue object?"), count ("how many red objects are
  there?") and relation ("is the red circle left of the blue square?", "what colour is the
  object above the blue square?"). An object is only asked about through a description that is
  unique in its scene; a scene lacks a type when no such question exists (a one-object scene has
  no relation question, two identical objects have no colour question), see ``type_available``.

``make_split(n, seed)`` returns a ``Split`` of tensors ready for training: images, tokenised
captions and questions with key-padding masks (True = padding, the polarity of
``nn.MultiheadAttention``'s ``key_padding_mask``), answer class indices into ``ANSWERS``, plus
the strings and the scene metadata. The scenes, captions and questions of a seed do not depend
on the image size or the noise level, only the pixels do.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Quadrant q sits in row q // 2 (0 = top) and column q % 2 (0 = left).
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("colour", "shape", "count", "relation")
COUNTS = ("zero", "one", "two", "three")
ANSWERS = COLOURS + SHAPES + COUNTS + ("yes", "no")
ANSWER_INDEX = {a: i for i, a in enumerate(ANSWERS)}

# Columns of the per-quadrant object table ``objects[..., (COLOUR, SHAPE, SIZE)]``; -1 = empty.
COLOUR, SHAPE, SIZE = 0, 1, 2

# Well separated in RGB: the closest pair of palette and background colours (blue, purple) is
# 0.52 apart, while the default noise moves a pixel by at most 0.09, so the nearest palette
# colour of every pixel is the colour it was drawn with (the tests rely on it).
PALETTE = np.array([
    [0.90, 0.12, 0.12],  # red
    [0.12, 0.80, 0.20],  # green
    [0.15, 0.30, 0.95],  # blue
    [0.95, 0.85, 0.10],  # yellow
    [0.65, 0.20, 0.85],  # purple
    [0.95, 0.95, 0.95],  # white
], dtype=np.float32)
BACKGROUND = np.array([0.06, 0.06, 0.08], dtype=np.float32)

# Few one-object scenes: there are only 6·4·2·4 = 192 distinct one-object captions, so a uniform
# object count would make ~15% of 1,000 captions duplicates (and retrieval ambiguous); with these
# weights 0.7% are (mean over 40 seeds; the test bounds it at 2%).
OBJECT_COUNT_PROBS = (0.04, 0.32, 0.64)

# Half-extent of a small / large object and the largest jitter of its centre, in quadrant
# widths; the jitter is also capped so that an object never leaves its quadrant.
_RADIUS = np.array([0.25, 0.40])
_MAX_JITTER = 0.125

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
            "cross": "crosses"}
_WORDS = (("a", "the") + SIZES + COLOURS + SHAPES + tuple(_PLURALS.values())
          + ("left", "right", "of", "above", "below", "and", "at", "on", "in", "top", "bottom")
          + ("what", "colour", "shape", "is", "object", "objects", "how", "many", "are",
             "there", "?"))

# Longest texts in tokens, <cls> included: a three-object caption is always 16 words ("a S C X
# left of a S C X and above a S C X"); the longest question is "is the large red circle left of
# the small red circle ?" (11 words and "?"). make_split pads to these, so every split of every
# seed has the same sequence lengths.
CAPTION_LEN = 17
QUESTION_LEN = 13

SeedLike = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Word-level tokenizer over a closed vocabulary; ``"?"`` is a token of its own.

    Id 0 is padding and id 1 the ``<cls>`` token that ``encode`` puts in front of every text (a
    slot whose output can stand for the whole text). A word outside the vocabulary is an error,
    not an unknown token: the data set's grammar is closed, so an unknown word is a bug.
    """

    PAD, CLS = "<pad>", "<cls>"

    def __init__(self, words: Sequence[str]):
        self.vocab = (self.PAD, self.CLS) + tuple(words)
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("duplicate words in the vocabulary")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.cls_id = 0, 1

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return text.replace("?", " ?").split()

    def encode(self, texts: Sequence[str], max_len: int | None = None):
        """``(ids, padding_mask)``: LongTensor and BoolTensor of shape ``(len(texts), L)``, True
        where padded. L is ``max_len`` or else the longest text; a longer text is an error
        (truncating would silently drop part of a caption)."""
        rows, seen = [], {}  # questions repeat a lot ("how many objects are there?")
        for text in texts:
            row = seen.get(text)
            if row is None:
                try:
                    row = seen[text] = [self.cls_id] + [self.index[w] for w in self.words(text)]
                except KeyError as e:
                    raise ValueError(f"word {e.args[0]!r} of {text!r} is not in the vocabulary")
            rows.append(row)
        longest = max((len(r) for r in rows), default=1)
        length = longest if max_len is None else max_len
        if longest > length:
            raise ValueError(f"a text has {longest} tokens, more than max_len={length}")
        pad = [self.pad_id] * length
        ids = torch.tensor([r + pad[len(r):] for r in rows], dtype=torch.long)
        ids = ids.reshape(len(rows), length)  # also for no texts at all
        return ids, ids == self.pad_id

    def decode(self, ids) -> Union[str, list[str]]:
        """Inverse of ``encode`` (special tokens dropped): a string for one row of ids, a list of
        strings for a 2-D tensor."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            words = [self.vocab[i] for i in ids.tolist() if i > self.cls_id]
            return " ".join(words).replace(" ?", "?")
        return [self.decode(row) for row in ids]


TOKENIZER = Tokenizer(_WORDS)


# ----------------------------------------------------------------------------- scenes and pixels

def sample_scenes(n: int, rng: np.random.Generator,
                  object_count_probs: Sequence[float] = OBJECT_COUNT_PROBS):
    """``(objects, jitter)``: ``objects`` int64 ``(n, 4, 3)`` holds (colour, shape, size) per
    quadrant, -1 where the quadrant is empty; ``jitter`` float ``(n, 4, 2)`` in [-1, 1] is each
    centre's (x, y) offset as a fraction of the largest allowed one."""
    p = np.asarray(object_count_probs, dtype=np.float64)
    if p.shape != (3,) or (p < 0).any() or not np.isclose(p.sum(), 1):
        raise ValueError("object_count_probs: three probabilities (1, 2, 3 objects) summing to 1")
    counts = rng.choice(3, size=n, p=p) + 1
    # The rank of each quadrant in a random permutation: the first `count` ranks are occupied,
    # so every scene gets distinct quadrants.
    rank = np.argsort(np.argsort(rng.random((n, 4)), axis=1), axis=1)
    present = rank < counts[:, None]
    attrs = np.stack([rng.integers(0, len(COLOURS), (n, 4)),
                      rng.integers(0, len(SHAPES), (n, 4)),
                      rng.integers(0, len(SIZES), (n, 4))], axis=-1)
    objects = np.where(present[..., None], attrs, -1).astype(np.int64)
    return objects, rng.uniform(-1.0, 1.0, (n, 4, 2))


def object_centres(objects: np.ndarray, jitter: np.ndarray, image_size: int) -> np.ndarray:
    """Object centres in pixels, float32 ``(n, 4, 2)`` as (x, y); NaN for empty quadrants."""
    q = image_size // 2
    radius = _RADIUS[np.maximum(objects[..., SIZE], 0)] * q
    shift = np.minimum(q / 2 - radius - 0.5, _MAX_JITTER * q)
    quadrant = np.arange(4)
    origin = np.stack([quadrant % 2, quadrant // 2], axis=-1) * q  # (4, 2): x, y
    centres = origin + q / 2 + jitter * shift[..., None]
    centres[objects[..., COLOUR] < 0] = np.nan
    return centres.astype(np.float32)


def _shape_mask(shape: int, dx, dy, r):
    # dx, dy: pixel centre minus object centre (y grows downwards); r: half-extent.
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == 0:  # circle
        return dx * dx + dy * dy <= r * r
    if shape == 1:  # square, a little smaller than the circle so their areas differ less
        return np.maximum(ax, ay) <= 0.8 * r
    if shape == 2:  # triangle, apex up, base 2r wide at dy = r
        return (ax <= 0.5 * (dy + r)) & (dy <= r)
    w = 0.35 * r  # cross: a plus sign with arms 0.7r thick
    return ((ax <= w) | (ay <= w)) & (np.maximum(ax, ay) <= r)


def render(objects: np.ndarray, centres: np.ndarray, image_size: int,
           rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """float32 images ``(n, 3, H, W)`` in [0, 1]: flat-coloured shapes on the background plus
    uniform pixel noise of standard deviation ``noise``.

    Objects never leave their quadrant, so each is rasterised on its quadrant's q×q grid only,
    all objects of one shape at once (one numpy expression per shape and chunk), into a map of
    palette indices; the pixels are then looked up from the palette.
    """
    if image_size % 2 or image_size < 32:
        # Below 32 pixels a small object is 4 pixels wide and crosses, circles and squares
        # become indistinguishable.
        raise ValueError(f"image_size must be even and at least 32, got {image_size}")
    n, q = len(objects), image_size // 2
    grid = np.arange(q, dtype=np.float32) + 0.5
    quadrant = np.arange(4)
    origin = (np.stack([quadrant % 2, quadrant // 2], axis=-1) * q).astype(np.float32)
    local = centres - origin  # centre within its quadrant
    labels = np.zeros((n, 4, q, q), dtype=np.uint8)  # 0 = background, 1 + colour index
    scene, quad = np.nonzero(objects[..., COLOUR] >= 0)
    chunk = max(1, (1 << 20) // (q * q))  # ~4 MB float32 temporaries per expression
    for s in range(len(SHAPES)):
        sel = np.nonzero(objects[scene, quad, SHAPE] == s)[0]
        for start in range(0, len(sel), chunk):
            i, k = scene[sel[start:start + chunk]], quad[sel[start:start + chunk]]
            cx, cy = local[i, k, 0, None, None], local[i, k, 1, None, None]
            r = (_RADIUS[objects[i, k, SIZE]] * q).astype(np.float32)[:, None, None]
            mask = _shape_mask(s, grid[None, None, :] - cx, grid[None, :, None] - cy, r)
            labels[i, k] = mask * (objects[i, k, COLOUR] + 1).astype(np.uint8)[:, None, None]
    # (scene, row, col, y, x) -> (scene, row, y, col, x) = (scene, H, W)
    labels = labels.reshape(n, 2, 2, q, q).transpose(0, 1, 3, 2, 4).reshape(
        n, image_size, image_size)

    lut = np.concatenate([BACKGROUND[None], PALETTE]).T.copy()  # (3 channels, 7 labels)
    # Uniform noise from random bytes: a quarter of the cost of Gaussian floats, and just as
    # good at making equal scenes differ. A byte b gives (b - 127.5)·step, whose standard
    # deviation is step·sqrt((256² - 1) / 12).
    step = np.float32(noise / np.sqrt((256 ** 2 - 1) / 12))
    images = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    rows = max(1, (1 << 16) // (image_size * image_size))  # chunks that stay in cache
    for start in range(0, n, rows):
        out = images[start:start + rows]
        np.take(lut, labels[start:start + rows], axis=1, out=out.transpose(1, 0, 2, 3))
        bytes_ = rng.integers(0, 256, out.shape, dtype=np.uint8)
        out += (bytes_.astype(np.float32) - np.float32(127.5)) * step
        np.clip(out, 0.0, 1.0, out=out)
    return images


# ----------------------------------------------------------------------------- captions

def _noun(obj) -> str:
    return f"a {SIZES[obj[SIZE]]} {COLOURS[obj[COLOUR]]} {SHAPES[obj[SHAPE]]}"


def caption(objects: np.ndarray) -> str:
    """The caption of one scene (``objects`` of shape (4, 3)); see the module docstring."""
    occupied = [k for k in range(4) if objects[k, COLOUR] >= 0]
    if len(occupied) == 1:
        a = occupied[0]
        return f"{_noun(objects[a])} in the {QUADRANTS[a]}"
    if len(occupied) == 2:
        a, b = occupied  # a is above or left of b
        first, second = _noun(objects[a]), _noun(objects[b])
        if a // 2 == b // 2:
            return f"{first} left of {second} at the {('top', 'bottom')[a // 2]}"
        if a % 2 == b % 2:
            return f"{first} above {second} on the {('left', 'right')[a % 2]}"
        return f"{first} above and {('left', 'right')[a % 2]} of {second}"
    if len(occupied) == 3:
        corner = 3 - (set(range(4)) - set(occupied)).pop()  # opposite the empty quadrant
        beside, under = corner ^ 1, corner ^ 2  # its row and column neighbours
        horizontal = "left of" if corner % 2 == 0 else "right of"
        vertical = "above" if corner // 2 == 0 else "below"
        return (f"{_noun(objects[corner])} {horizontal} {_noun(objects[beside])} "
                f"and {vertical} {_noun(objects[under])}")
    raise ValueError(f"a scene holds 1 to 3 objects, got {len(occupied)}")


_NP = (rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")
_CAPTION_FORMS = [
    (re.compile(rf"{_NP} in the ({'|'.join(QUADRANTS)})"),
     lambda g: {QUADRANTS.index(g[3]): g[0:3]}),
    (re.compile(rf"{_NP} left of {_NP} at the (top|bottom)"),
     lambda g: {2 * (g[6] == "bottom"): g[0:3], 2 * (g[6] == "bottom") + 1: g[3:6]}),
    (re.compile(rf"{_NP} above {_NP} on the (left|right)"),
     lambda g: {(g[6] == "right"): g[0:3], (g[6] == "right") + 2: g[3:6]}),
    (re.compile(rf"{_NP} above and (left|right) of {_NP}"),
     lambda g: {(g[3] == "right"): g[0:3], 3 - (g[3] == "right"): g[4:7]}),
    (re.compile(rf"{_NP} (left|right) of {_NP} and (above|below) {_NP}"),
     lambda g: {(g[3] == "right") + 2 * (g[7] == "below"): g[0:3],
                (g[3] == "left") + 2 * (g[7] == "below"): g[4:7],
                (g[3] == "right") + 2 * (g[7] == "above"): g[8:11]}),
]


def parse_caption(text: str) -> np.ndarray:
    """Inverse of ``caption``: the (4, 3) object table (colour, shape, size per quadrant, -1
    where empty) that a caption describes. Raises ValueError for text outside the grammar."""
    for pattern, quadrants in _CAPTION_FORMS:
        m = pattern.fullmatch(text)
        if m:
            objects = np.full((4, 3), -1, dtype=np.int64)
            for k, (size, colour, shape) in quadrants(m.groups()).items():
                objects[int(k)] = (COLOURS.index(colour), SHAPES.index(shape),
                                   SIZES.index(size))
            return objects
    raise ValueError(f"not a caption of this data set: {text!r}")


# ----------------------------------------------------------------------------- questions

_RELATIONS = {  # on quadrant indices: row q // 2, column q % 2
    "left of": lambda a, b: a % 2 < b % 2,
    "right of": lambda a, b: a % 2 > b % 2,
    "above": lambda a, b: a // 2 < b // 2,
    "below": lambda a, b: a // 2 > b // 2,
}
# Descriptions tried in order until one is unique in the scene (never naming what is asked).
_COLOUR_Q = ((SHAPE,), (SIZE, SHAPE))
_SHAPE_Q = ((COLOUR,), (SIZE, COLOUR))
_RELATION_Q = ((COLOUR, SHAPE), (SIZE, COLOUR, SHAPE))


def _describer(occupied):
    # describe(obj, ladder): the first description in the ladder that fits only obj among the
    # scene's occupied (quadrant, (colour, shape, size)) pairs, or None.
    seen = {}
    for attrs in _COLOUR_Q + _SHAPE_Q + _RELATION_Q:
        for _, o in occupied:
            key = (attrs, tuple(o[a] for a in attrs))
            seen[key] = seen.get(key, 0) + 1

    def describe(obj, ladder):
        for attrs in ladder:
            if seen[attrs, tuple(obj[a] for a in attrs)] == 1:
                words = ([SIZES[obj[SIZE]]] if SIZE in attrs else []) \
                    + ([COLOURS[obj[COLOUR]]] if COLOUR in attrs else []) \
                    + [SHAPES[obj[SHAPE]] if SHAPE in attrs else "object"]
                return "the " + " ".join(words)
        return None
    return describe


def scene_questions(objects) -> dict[str, list[tuple[str, str, float]]]:
    """Every question one scene (``objects`` (4, 3)) supports, by type: ``(question, answer,
    weight)``. Weights make the sampler pick each group of a type equally often (e.g. "yes" and
    "no" relation questions), not each question; an empty list means the scene lacks that type."""
    # Plain Python tuples: this runs once per scene, and numpy scalars would make it 3x slower.
    table = objects.tolist() if isinstance(objects, np.ndarray) else objects
    occupied = [(k, tuple(table[k])) for k in range(4) if table[k][COLOUR] >= 0]
    describe = _describer(occupied)
    out = {t: [] for t in QUESTION_TYPES}
    for k, obj in occupied:
        d = describe(obj, _COLOUR_Q)
        if d:
            out["colour"].append((f"what colour is {d}?", COLOURS[obj[COLOUR]], 1.0))
        d = describe(obj, _SHAPE_Q)
        if d:
            out["shape"].append((f"what shape is {d}?", SHAPES[obj[SHAPE]], 1.0))

    colours, shapes, sizes = ([o[a] for _, o in occupied] for a in (COLOUR, SHAPE, SIZE))
    out["count"].append(("how many objects are there?", COUNTS[len(occupied)], 1 / 4))
    out["count"] += [(f"how many {c} objects are there?", COUNTS[colours.count(i)],
                      1 / 4 / len(COLOURS)) for i, c in enumerate(COLOURS)]
    out["count"] += [(f"how many {_PLURALS[s]} are there?", COUNTS[shapes.count(i)],
                      1 / 4 / len(SHAPES)) for i, s in enumerate(SHAPES)]
    out["count"] += [(f"how many {z} objects are there?", COUNTS[sizes.count(i)],
                      1 / 4 / len(SIZES)) for i, z in enumerate(SIZES)]

    named = [(k, describe(obj, _RELATION_Q)) for k, obj in occupied]
    named = [(k, d) for k, d in named if d]
    groups = {"yes": [], "no": [], "colour": []}
    for b, db in named:
        for rel, holds in _RELATIONS.items():
            for a, da in named:
                if a != b:
                    answer = "yes" if holds(a, b) else "no"
                    groups[answer].append((f"is {da} {rel} {db}?", answer))
            matches = [o for a, o in occupied if a != b and holds(a, b)]
            if len(matches) == 1:
                groups["colour"].append((f"what colour is the object {rel} {db}?",
                                         COLOURS[matches[0][COLOUR]]))
    for group in groups.values():
        out["relation"] += [(q, a, 1 / len(group)) for q, a in group]
    return out


def _pick(candidates, used, u):
    # Weighted choice among the candidates not used yet for this scene (all once exhausted).
    free = [i for i in range(len(candidates)) if i not in used] or list(range(len(candidates)))
    cum = list(itertools.accumulate(candidates[i][2] for i in free))
    i = free[min(bisect.bisect_right(cum, u * cum[-1]), len(free) - 1)]
    used.add(i)
    return candidates[i]


def sample_questions(objects: np.ndarray, per_scene: int, rng: np.random.Generator):
    """``per_scene`` questions for each scene of ``objects`` (n, 4, 3): a list of n lists of
    ``(question, answer, type index)``, plus the BoolTensor ``(n, len(QUESTION_TYPES))`` of
    which types each scene supports.

    Each scene first gets one question of every type it supports (a random cyclic run of them
    when ``per_scene`` is smaller); the remaining slots draw a supported type uniformly. Within a
    type, questions are drawn by weight without repeats while unused ones remain.
    """
    u = rng.random((len(objects), max(per_scene, 1), 2))
    scenes, available = [], []
    u = u.tolist()
    for s, obj in enumerate(np.asarray(objects).tolist()):
        cands = scene_questions(obj)
        types = [t for t in range(len(QUESTION_TYPES)) if cands[QUESTION_TYPES[t]]]
        available.append([t in types for t in range(len(QUESTION_TYPES))])
        if per_scene <= len(types):
            start = int(u[s][0][0] * len(types))
            chosen = [types[(start + i) % len(types)] for i in range(per_scene)]
        else:
            chosen = types + [types[int(u[s][i][0] * len(types))]
                              for i in range(len(types), per_scene)]
        used = {t: set() for t in types}
        qa = []
        for i, t in enumerate(chosen):
            question, answer, _ = _pick(cands[QUESTION_TYPES[t]], used[t], u[s][i][1])
            qa.append((question, answer, t))
        scenes.append(qa)
    return scenes, torch.tensor(available, dtype=torch.bool).reshape(-1, len(QUESTION_TYPES))


# ----------------------------------------------------------------------------- splits

@dataclasses.dataclass(frozen=True)
class Split:
    """n scenes with their captions and ``n · questions_per_image`` questions.

    Tensors: ``images`` (n, 3, H, W) float32 in [0, 1]; ``caption_ids`` / ``caption_mask``
    (n, CAPTION_LEN) long / bool (True = padding); ``question_ids`` / ``question_mask``
    (m, QUESTION_LEN); ``question_image`` (m,) the image each question is about (questions of a
    scene are consecutive); ``answers`` (m,) index into ``ANSWERS``; ``question_type`` (m,) index
    into ``QUESTION_TYPES``; ``type_available`` (n, 4) bool; ``objects`` (n, 4, 3) long,
    (colour, shape, size) per quadrant, -1 = empty; ``centres`` (n, 4, 2) float32 (x, y) pixels,
    NaN where empty. Strings: ``captions`` (n), ``questions`` and ``answer_text`` (m).
    """

    images: torch.Tensor
    caption_ids: torch.Tensor
    caption_mask: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    question_image: torch.Tensor
    answers: torch.Tensor
    question_type: torch.Tensor
    type_available: torch.Tensor
    objects: torch.Tensor
    centres: torch.Tensor
    captions: list
    questions: list
    answer_text: list
    seed: SeedLike
    image_size: int

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def questions_per_image(self) -> int:
        return self.question_ids.shape[0] // max(len(self), 1)

    def to(self, device) -> "Split":
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})


def make_split(n: int, seed: SeedLike, *, image_size: int = 32, questions_per_image: int = 4,
               noise: float = 0.03,
               object_count_probs: Sequence[float] = OBJECT_COUNT_PROBS) -> Split:
    """n scenes generated from ``seed`` (an int, or a tuple of ints such as (seed, split));
    the same arguments give bitwise equal tensors."""
    # Independent streams, so that image size and noise change the pixels only.
    scene_rng, noise_rng, question_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    objects, jitter = sample_scenes(n, scene_rng, object_count_probs)
    centres = object_centres(objects, jitter, image_size)
    images = render(objects, centres, image_size, noise_rng, noise)
    captions = [caption(o) for o in objects]
    qa, available = sample_questions(objects, questions_per_image, question_rng)
    flat = [item for scene in qa for item in scene]
    questions = [q for q, _, _ in flat]
    answer_text = [a for _, a, _ in flat]
    caption_ids, caption_mask = TOKENIZER.encode(captions, CAPTION_LEN)
    question_ids, question_mask = TOKENIZER.encode(questions, QUESTION_LEN)
    return Split(
        images=torch.from_numpy(images),
        caption_ids=caption_ids, caption_mask=caption_mask,
        question_ids=question_ids, question_mask=question_mask,
        question_image=torch.arange(n).repeat_interleave(questions_per_image),
        answers=torch.tensor([ANSWER_INDEX[a] for a in answer_text], dtype=torch.long),
        question_type=torch.tensor([t for _, _, t in flat], dtype=torch.long),
        type_available=available,
        objects=torch.from_numpy(objects), centres=torch.from_numpy(centres),
        captions=captions, questions=questions, answer_text=answer_text,
        seed=seed, image_size=image_size)


def train_test_splits(n_train: int, n_test: int, seed: int = 0, **kwargs) -> tuple[Split, Split]:
    """A training and a held-out split from distinct seed streams, (seed, 1) and (seed, 2)."""
    return make_split(n_train, (seed, 1), **kwargs), make_split(n_test, (seed, 2), **kwargs)


def save_gallery(images, texts: Sequence[str], path, ncols: int = 4) -> None:
    """A PNG grid of images (k, 3, H, W) in [0, 1], each titled with its text (line breaks
    allowed), for the demo's gallery. Needs matplotlib, imported only here."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    k = len(images)
    ncols = max(1, min(ncols, k))
    nrows = (k + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, texts):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(text, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
