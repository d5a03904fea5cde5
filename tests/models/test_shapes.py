"""The offline shapes data set: determinism, pixels against the scene metadata, captions that
determine the scene, answers against an independent oracle, the tokenizer."""
import re

import numpy as np
import pytest
import torch

from mmkernels.models import shapes as S

TENSORS = ("images", "caption_ids", "caption_mask", "question_ids", "question_mask",
           "question_image", "answers", "question_type", "type_available", "objects", "centres")


def _seed() -> int:
    # From torch's per-test stream (conftest): fresh every run, replayable with MMK_TEST_SEED.
    return int(torch.randint(0, 2**31, ()))


def _bits(t):
    # Bitwise view, so that equal NaNs (empty quadrants' centres) compare equal.
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(a, b) -> bool:
    return (all(torch.equal(_bits(getattr(a, f)), _bits(getattr(b, f))) for f in TENSORS)
            and (a.captions, a.questions, a.answer_text) == (b.captions, b.questions,
                                                              b.answer_text))


def test_same_seed_same_split_other_seed_other_split():
    seed = _seed()
    a, b = S.make_split(300, seed), S.make_split(300, seed)
    assert _same(a, b)
    other = S.make_split(300, seed + 1)
    assert not torch.equal(a.images, other.images)
    assert sum(x != y for x, y in zip(a.captions, other.captions)) > 250
    train, test = S.train_test_splits(300, 300, seed)
    assert not torch.equal(train.images, test.images) and train.captions != test.captions
    # Image size and noise change the pixels only.
    big = S.make_split(300, seed, image_size=64, noise=0.05)
    assert (big.captions, big.questions, big.answer_text) == (a.captions, a.questions,
                                                              a.answer_text)
    assert torch.equal(big.objects, a.objects)
    # The same jitter fraction, of a slightly different largest shift (a half-pixel margin).
    assert torch.allclose(big.centres, 2 * a.centres, atol=1.0, equal_nan=True)


@pytest.mark.parametrize("image_size,per_image", [(32, 4), (64, 3), (48, 6)])
def test_shapes_and_dtypes(image_size, per_image):
    n = 50
    split = S.make_split(n, _seed(), image_size=image_size, questions_per_image=per_image)
    m = n * per_image
    assert len(split) == n and split.questions_per_image == per_image
    expected = {
        "images": ((n, 3, image_size, image_size), torch.float32),
        "caption_ids": ((n, S.CAPTION_LEN), torch.long),
        "caption_mask": ((n, S.CAPTION_LEN), torch.bool),
        "question_ids": ((m, S.QUESTION_LEN), torch.long),
        "question_mask": ((m, S.QUESTION_LEN), torch.bool),
        "question_image": ((m,), torch.long), "answers": ((m,), torch.long),
        "question_type": ((m,), torch.long),
        "type_available": ((n, len(S.QUESTION_TYPES)), torch.bool),
        "objects": ((n, 4, 3), torch.long), "centres": ((n, 4, 2), torch.float32),
    }
    for name, (shape, dtype) in expected.items():
        t = getattr(split, name)
        assert (tuple(t.shape), t.dtype) == (shape, dtype), name
    assert 0 <= split.images.min() and split.images.max() <= 1
    assert (len(split.captions), len(split.questions), len(split.answer_text)) == (n, m, m)
    assert torch.equal(split.question_image, torch.arange(n).repeat_interleave(per_image))
    assert split.answers.max() < len(S.ANSWERS) and split.question_type.max() < 4
    assert [S.ANSWERS[i] for i in split.answers] == split.answer_text
    counts = (split.objects[..., 0] >= 0).sum(1)
    assert 1 <= counts.min() and counts.max() <= 3
    assert _same(split.to("cpu"), split)
    with pytest.raises(ValueError, match="image_size"):
        S.make_split(2, 0, image_size=30)


def _pixel_labels(images: np.ndarray) -> np.ndarray:
    # Nearest of background (0) and the palette (1 + colour) for every pixel.
    lut = np.concatenate([S.BACKGROUND[None], S.PALETTE])
    return ((images.transpose(0, 2, 3, 1)[..., None, :] - lut) ** 2).sum(-1).argmin(-1)


def _shape_of(mask: np.ndarray) -> str:
    # Recognise a drawn shape from its pixels alone.
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    half = len(box) // 2
    if box[-half:].sum() > 1.8 * box[:half].sum():
        return "triangle"  # apex up: three times as much below its middle as above
    return "circle" if fill > 0.68 else "cross"


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_every_object_is_drawn_in_its_quadrant(image_size):
    n, q = 400, image_size // 2
    split = S.make_split(n, _seed(), image_size=image_size)
    labels = _pixel_labels(split.images.numpy())
    objects, centres = split.objects.numpy(), split.centres.numpy()
    area = {"circle": np.pi, "square": 1.6 ** 2, "triangle": 2.0, "cross": 2.31}
    for i in range(n):
        for k in range(4):
            row, col = divmod(k, 2)
            quadrant = labels[i, row * q:(row + 1) * q, col * q:(col + 1) * q]
            colour, shape, size = objects[i, k]
            if colour < 0:
                assert (quadrant == 0).all() and np.isnan(centres[i, k]).all()
                continue
            # Only background and the object's colour, and no pixel on the quadrant's border.
            assert set(np.unique(quadrant)) == {0, colour + 1}, (i, k)
            mask = quadrant == colour + 1
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            x, y = centres[i, k]
            assert labels[i, int(y), int(x)] == colour + 1  # the centre pixel is the object's
            r = (0.25, 0.40)[size] * q
            expected = area[S.SHAPES[shape]] * r * r
            assert 0.7 * expected <= mask.sum() <= 1.3 * expected, (i, k)
            assert _shape_of(mask) == S.SHAPES[shape], (i, k)


def test_pixel_noise_makes_equal_scenes_differ():
    objects = np.array([[[0, 0, 1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]] * 2)
    centres = S.object_centres(objects, np.zeros((2, 4, 2)), 32)
    images = S.render(objects, centres, 32, np.random.default_rng(_seed()), noise=0.03)
    assert not np.array_equal(images[0], images[1])
    assert 0.02 < (images[0] - images[1]).std() / np.sqrt(2) < 0.04
    quiet = S.render(objects, centres, 32, np.random.default_rng(0), noise=0.0)
    assert np.array_equal(quiet[0], quiet[1])


def _scene(**quadrants):
    # _scene(top_left=("large", "red", "circle"), ...) -> (4, 3) object table
    objects = np.full((4, 3), -1)
    for name, (size, colour, shape) in quadrants.items():
        objects[S.QUADRANTS.index(name.replace("_", " "))] = (
            S.COLOURS.index(colour), S.SHAPES.index(shape), S.SIZES.index(size))
    return objects


@pytest.mark.parametrize("quadrants,text", [
    (dict(top_right=("large", "purple", "square")), "a large purple square in the top right"),
    (dict(bottom_left=("large", "red", "circle"), bottom_right=("small", "blue", "square")),
     "a large red circle left of a small blue square at the bottom"),
    (dict(top_right=("small", "green", "triangle"), bottom_right=("large", "white", "cross")),
     "a small green triangle above a large white cross on the right"),
    (dict(top_right=("small", "red", "cross"), bottom_left=("large", "blue", "circle")),
     "a small red cross above and right of a large blue circle"),
    (dict(top_left=("small", "red", "cross"), bottom_right=("large", "blue", "circle")),
     "a small red cross above and left of a large blue circle"),
    (dict(top_left=("small", "red", "circle"), top_right=("large", "blue", "square"),
          bottom_left=("small", "green", "cross")),
     "a small red circle left of a large blue square and above a small green cross"),
    (dict(top_left=("small", "red", "circle"), bottom_left=("large", "blue", "square"),
          bottom_right=("small", "green", "cross")),
     "a large blue square left of a small green cross and below a small red circle"),
])
def test_caption_grammar(quadrants, text):
    objects = _scene(**quadrants)
    assert S.caption(objects) == text
    assert np.array_equal(S.parse_caption(text), objects)


def test_captions_determine_their_scenes():
    split = S.make_split(1000, _seed())
    for text, objects in zip(split.captions, split.objects.numpy()):
        assert np.array_equal(S.parse_caption(text), objects), text
    with pytest.raises(ValueError):
        S.parse_caption("a large red circle left of a small blue square")  # which row?


def test_few_duplicate_captions():
    # Two scenes with one caption make retrieval ambiguous; the rate is ~0.7% (most of them
    # one-object scenes, of which only 192 captions exist).
    captions = S.make_split(1000, _seed()).captions
    duplicates = len(captions) - len(set(captions))
    assert duplicates <= 20, duplicates


# An oracle for the answers, written from the question grammar alone.
_DESC = r"the (?:(small|large) )?(?:(\w+) )?(\w+)"


def _find(objects, size, colour, shape):
    # Quadrants of the objects fitting a description; shape "object" matches any shape.
    return [k for k in range(4) if objects[k, 0] >= 0
            and (size is None or S.SIZES[objects[k, 2]] == size)
            and (colour is None or S.COLOURS[objects[k, 0]] == colour)
            and (shape == "object" or S.SHAPES[objects[k, 1]] == shape)]


def _holds(rel, a, b):
    return {"left of": a % 2 < b % 2, "right of": a % 2 > b % 2,
            "above": a // 2 < b // 2, "below": a // 2 > b // 2}[rel]


def _oracle(question, objects):
    """(type, answer) of a question about the scene ``objects``."""
    def one(size, first, second):
        # "the [size] [colour] shape" or "the [size] [colour] object"
        colour, shape = (first, second) if first else (None, second)
        if colour is not None and colour not in S.COLOURS:  # "the large circle": no colour
            size, colour = colour, None
        found = _find(objects, size, colour, shape)
        assert len(found) == 1, question
        return found[0]

    words = S.COUNTS
    if m := re.fullmatch(r"how many (?:(\w+) )?(\w+) are there\?", question):
        adjective, noun = m.groups()
        if noun != "objects":
            n = len(_find(objects, None, None, noun[:-2] if noun == "crosses" else noun[:-1]))
        elif adjective is None:
            n = len(_find(objects, None, None, "object"))
        elif adjective in S.SIZES:
            n = len(_find(objects, adjective, None, "object"))
        else:
            n = len(_find(objects, None, adjective, "object"))
        return "count", words[n]
    rel = "(left of|right of|above|below)"
    if m := re.fullmatch(rf"what colour is the object {rel} {_DESC}\?", question):
        b = one(*m.groups()[1:])
        found = [a for a in range(4) if objects[a, 0] >= 0 and a != b and _holds(m[1], a, b)]
        assert len(found) == 1, question
        return "relation", S.COLOURS[objects[found[0], 0]]
    if m := re.fullmatch(rf"is {_DESC} {rel} {_DESC}\?", question):
        a, b = one(*m.groups()[:3]), one(*m.groups()[4:])
        assert a != b
        return "relation", "yes" if _holds(m[4], a, b) else "no"
    if m := re.fullmatch(rf"what colour is {_DESC}\?", question):
        assert m[3] in S.SHAPES and (m[2] is None or m[2] in S.SIZES)  # colour never named
        return "colour", S.COLOURS[objects[one(*m.groups()), 0]]
    if m := re.fullmatch(rf"what shape is {_DESC}\?", question):
        assert m[3] == "object"
        return "shape", S.SHAPES[objects[one(*m.groups()), 1]]
    raise AssertionError(f"question outside the grammar: {question}")


def test_answers_against_an_oracle():
    per_image = 5
    split = S.make_split(600, _seed(), questions_per_image=per_image)
    objects = split.objects.numpy()
    for question, answer, t, i in zip(split.questions, split.answer_text,
                                      split.question_type.tolist(),
                                      split.question_image.tolist()):
        assert _oracle(question, objects[i]) == (S.QUESTION_TYPES[t], answer), question
    # Each scene gets one question of every type it supports; one-object scenes lack relations.
    types = split.question_type.reshape(-1, per_image)
    for i in range(len(split)):
        asked = set(types[i].tolist())
        assert asked == set(split.type_available[i].nonzero().flatten().tolist())
        n_objects = int((objects[i, :, 0] >= 0).sum())
        if n_objects == 1:
            assert asked == {0, 1, 2}
        present = objects[i][objects[i, :, 0] >= 0]
        if n_objects > 1 and all(len(set(present[:, a])) == n_objects for a in (0, 1)):
            assert asked == {0, 1, 2, 3}  # all colours and all shapes distinct: every type
    # Every type and every answer class occurs, and yes/no are balanced.
    assert torch.bincount(split.question_type, minlength=4).min() > 0.2 * len(split)
    assert (torch.bincount(split.answers, minlength=len(S.ANSWERS)) > 0).all()
    yes, no = split.answer_text.count("yes"), split.answer_text.count("no")
    assert 0.7 < yes / no < 1.4


def test_questions_with_fewer_slots_than_types_and_ambiguous_objects():
    twins = _scene(top_left=("large", "red", "circle"), bottom_right=("large", "red", "circle"))
    cands = S.scene_questions(twins)
    assert cands["colour"] == cands["shape"] == cands["relation"] == []
    assert ("how many red objects are there?", "two") in [c[:2] for c in cands["count"]]
    split = S.make_split(300, _seed(), questions_per_image=2)
    types = split.question_type.reshape(-1, 2)
    several = split.type_available.sum(1) >= 2  # not twins: two distinct types
    assert (types[several, 0] != types[several, 1]).all()
    assert torch.bincount(types.flatten(), minlength=4).min() > 0.15 * types.numel()


def test_tokenizer_round_trip_and_padding_mask():
    tok = S.TOKENIZER
    assert tok.vocab_size == len(tok) == 42 and tok.vocab[0] == "<pad>" and tok.pad_id == 0
    split = S.make_split(200, _seed())
    for texts, ids, mask in ((split.captions, split.caption_ids, split.caption_mask),
                             (split.questions, split.question_ids, split.question_mask)):
        assert tok.decode(ids) == texts
        assert torch.equal(mask, ids == 0)  # True = padding: key_padding_mask polarity
        assert (ids[:, 0] == tok.cls_id).all() and not mask[:, 0].any()
        lengths = (~mask).sum(1)
        assert torch.equal(lengths, torch.tensor([len(tok.words(t)) + 1 for t in texts]))
        # Padding only at the end.
        assert torch.equal(mask, torch.arange(ids.shape[1]) >= lengths[:, None])
    assert split.caption_ids.shape[1] == (~split.caption_mask).sum(1).max()  # 3 objects: full

    ids, mask = tok.encode(["how many objects are there?", "what shape is the red object?"])
    assert ids.shape == mask.shape == (2, 8) and mask.tolist()[0] == [False] * 7 + [True]
    assert tok.decode(ids[1]) == "what shape is the red object?"
    assert tok.encode(["a red circle"], max_len=6)[0].shape == (1, 6)
    assert tok.encode([], max_len=5)[0].shape == (0, 5)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["a large red circle in the top left"], max_len=4)
    with pytest.raises(ValueError, match="'hexagon'"):
        tok.encode(["a red hexagon"])


def test_gallery_png(tmp_path):
    pytest.importorskip("matplotlib")
    split = S.make_split(3, _seed())
    path = tmp_path / "gallery.png"
    S.save_gallery(split.images, [c.replace(" and ", "\nand ") for c in split.captions], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
