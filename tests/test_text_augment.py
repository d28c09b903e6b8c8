"""Text augmentation (survey §3.2.2): each op's effect at p=1 and identity at p=0, SwitchOut's count
distribution against its formula, typo edit distance, WordNet synonyms from the real files, seeding, and
the text datamodules' ``train_transform`` (training batches only, labels untouched, raw and WordPiece)."""
from __future__ import annotations

import json
import math
import os
import random
import time

import lightning as L
import pytest
import torch
from conftest import WORDNET_DIR, needs_wordnet

from lightning_eff.data import WordNetSupersenseDataModule
from lightning_eff.errors import ConfigError, DataNotFoundError
from lightning_eff.learning.augment.text import (
    CharNoise,
    SwitchOut,
    SynonymReplace,
    TextAugment,
    WordDropout,
    WordSwap,
    check_text_transform,
    wordnet_synonyms,
)

T = "lightning_eff.learning.augment.text."
TEXT = "a small domesticated carnivorous mammal with soft fur and retractile claws"
CAR = {"auto", "automobile", "machine", "motorcar", "railcar", "railway car", "railroad car", "cable car",
       "elevator car", "gondola"}


def _osa(a: str, b: str) -> int:
    """Optimal-string-alignment distance (Levenshtein + adjacent transposition), the typo metric."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


@pytest.mark.parametrize("op", [WordDropout(0.0), WordSwap(0.0), CharNoise(0.0), SwitchOut(tau=1e-3)])
def test_ops_are_identity_at_zero(op):
    rng = random.Random(0)
    for text in (TEXT, "  odd   spacing kept ", "", "one"):
        assert op(text, rng) == text


def test_word_dropout_keeps_one_word_and_drops_at_p1():
    rng = random.Random(0)
    for _ in range(50):
        out = WordDropout(1.0)(TEXT, rng)
        assert len(out.split()) == 1 and out in TEXT.split()
    for _ in range(200):
        assert WordDropout(0.9)("two words", rng).split()  # never empty
    lengths = [len(WordDropout(0.5)(TEXT, rng).split()) for _ in range(400)]
    assert abs(sum(lengths) / len(lengths) - 5.5) < 0.3  # 11 words, half kept
    assert WordDropout(1.0)("", rng) == ""


def test_word_swap_swaps_disjoint_adjacent_pairs():
    assert WordSwap(1.0)("a b c d e", random.Random(0)) == "b a d c e"
    rng = random.Random(1)
    for _ in range(50):
        out = WordSwap(0.5)(TEXT, rng).split()
        assert sorted(out) == sorted(TEXT.split())
        moved = [abs(out.index(w) - i) for i, w in enumerate(TEXT.split())]
        assert max(moved) <= 1  # a word moves at most one place


def _expected_count(tau: float, length: int) -> float:
    w = [math.exp(-n / tau) for n in range(length + 1)]
    return sum(n * x for n, x in enumerate(w)) / sum(w)


@pytest.mark.parametrize("tau", [0.5, 2.0, 100.0])
def test_switchout_replacement_count_follows_exp_minus_n_over_tau(tau):
    vocab = [f"v{i}" for i in range(50)]
    words = TEXT.split()
    op, rng = SwitchOut(tau=tau, vocab=vocab), random.Random(0)
    counts = []
    for _ in range(3000):
        out = op(TEXT, rng).split()
        assert len(out) == len(words) and all(o == w or o in vocab for o, w in zip(out, words, strict=True))
        counts.append(sum(o != w for o, w in zip(out, words, strict=True)))
    mean, want = sum(counts) / len(counts), _expected_count(tau, len(words))
    sd = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts))
    assert abs(mean - want) < 4 * sd / math.sqrt(len(counts)) + 0.02, (mean, want)
    z = sum(math.exp(-n / tau) for n in range(len(words) + 1))
    for n in range(len(words) + 1):  # the whole distribution, not only its mean
        pn, freq = math.exp(-n / tau) / z, counts.count(n) / len(counts)
        assert abs(freq - pn) < 4 * math.sqrt(pn * (1 - pn) / len(counts)) + 0.003, (n, freq, pn)


def test_switchout_vocabulary_fit_and_fallback():
    rng = random.Random(0)
    fitted = SwitchOut(tau=50.0).fit(["alpha beta, gamma.", "beta delta"])
    assert fitted.vocab == ["alpha", "beta", "delta", "gamma"]  # punctuation stripped, sorted
    out = fitted("one two three four five", rng).split()
    assert all(w in {"one", "two", "three", "four", "five"} | set(fitted.vocab) for w in out)
    given = SwitchOut(tau=50.0, vocab=["zz"]).fit(["alpha beta"])
    assert given.vocab == ["zz"]  # a vocab given explicitly is kept
    own = SwitchOut(tau=50.0)  # never fitted: the words of the text itself
    for _ in range(20):
        assert set(own("x y, z", rng).replace(",", "").split()) <= {"x", "y", "z"}
    assert SwitchOut(tau=50.0, vocab=["same"])("same same", rng) == "same same"  # nothing else to draw


def test_char_noise_one_edit_per_alphabetic_word():
    rng = random.Random(0)
    text = "The quick brown fox, 3rd don't jumps!"
    for _ in range(100):
        out, src = CharNoise(1.0)(text, rng).split(), text.split()
        assert len(out) == len(src)
        for o, s in zip(out, src, strict=True):
            if s in ("3rd", "don't"):
                assert o == s  # not alphabetic: untouched
            else:
                assert _osa(o, s) == 1 and o[-1] == s[-1] if s[-1] in ",!" else _osa(o, s) == 1
    for _ in range(30):
        out = CharNoise(1.0, ops=["delete"])("abc Hello", rng).split()
        assert [len(w) for w in out] == [2, 4]
        swapped = CharNoise(1.0, ops=("swap",))("ab", rng)
        assert swapped == "ba"
        assert CharNoise(1.0, ops=("swap",))("aa", rng) == "aa"  # no swap changes it: left alone
        sub = CharNoise(1.0, ops=("substitute",))("S", rng)
        assert sub.isupper() and sub != "S" and sub.lower() in "awedxz"  # a keyboard neighbour of s, case kept


@needs_wordnet
def test_synonym_replace_uses_real_wordnet_synonyms():
    wordnet_synonyms.cache_clear()
    start = time.perf_counter()
    index = wordnet_synonyms(WORDNET_DIR, ("noun", "verb", "adj", "adv"))
    built = time.perf_counter() - start
    assert built < 3.0, built
    assert set(index["car"]) == CAR
    op, rng = SynonymReplace(p=1.0), random.Random(0)
    seen = set()
    for _ in range(40):
        out = op("car", rng)
        assert out in CAR
        seen.add(out)
        cap = op("Car,", rng)
        assert cap.endswith(",") and cap[0].isupper() and cap[:-1].lower() in CAR
        assert op("CAR", rng).lower() in CAR and op("CAR", rng).isupper()
    assert len(seen) > 3  # a random synonym, not always the first
    assert op("xyzzyq the a in it", rng) == "xyzzyq the a in it"  # no synonyms / function words
    assert SynonymReplace(p=0.0)("car", rng) == "car"
    nouns = SynonymReplace(p=1.0, pos=["noun"])
    assert nouns("quickly", rng) == "quickly"  # an adverb: not in the noun index
    assert SynonymReplace(p=1.0, pos=["adv"])("quickly", rng) in {"rapidly", "speedily", "chop-chop", "apace", "fast"}


def test_synonym_replace_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"(?s)data\.noun.*apt-get update && apt-get install -y wordnet-base"):
        SynonymReplace(p=0.1, wordnet_root=str(tmp_path))


def test_seed_is_respected():
    ops = lambda: [WordDropout(0.2), WordSwap(0.2), CharNoise(0.3), SwitchOut(tau=1.0)]  # noqa: E731
    texts = [TEXT] * 8
    a, b, c = TextAugment(ops(), seed=1)(texts), TextAugment(ops(), seed=1)(texts), TextAugment(ops(), seed=2)(texts)
    assert a == b and a != c
    assert len(set(a)) > 1  # one stream across the batch: texts differ from each other
    glob = TextAugment(ops())  # seed=None: Python's global random
    random.seed(5)
    first = glob(texts)
    random.seed(5)
    assert glob(texts) == first
    assert TextAugment(ops(), p_apply=0.0, seed=0)(texts) == texts


def test_text_augment_from_target_mappings_and_fit():
    node = {"_target_": T + "TextAugment", "ops": [{"_target_": T + "WordSwap", "p": 1.0},
                                                 {"_target_": T + "SwitchOut", "tau": 0.5}], "seed": 3}
    aug = check_text_transform("data.train_transform", node)
    assert isinstance(aug, TextAugment) and [type(o) for o in aug.ops] == [WordSwap, SwitchOut] and aug.seed == 3
    aug.fit(["alpha beta"])
    assert aug.ops[1].vocab == ["alpha", "beta"]
    direct = TextAugment([{"_target_": T + "WordSwap", "p": 1.0}])
    assert direct(["a b"]) == ["b a"]
    assert isinstance(check_text_transform("x", [WordSwap(1.0)]), TextAugment)
    assert check_text_transform("x", WordSwap(1.0))(["a b"]) == ["b a"]  # one op is wrapped
    fn = str.split
    assert check_text_transform("x", fn) is fn and check_text_transform("x", None) is None


@pytest.mark.parametrize("make,match", [
    (lambda: WordDropout(p=1.5), r"p=1\.5.*\[0\.0, 1\.0\]"),
    (lambda: WordSwap(p="high"), r"p='high' must be a number"),
    (lambda: SwitchOut(tau=0), r"tau=0.*\(0\.0, inf\]"),
    (lambda: SwitchOut(tau=1.0, vocab=[]), r"vocab=\[\]"),
    (lambda: CharNoise(p=0.1, ops=["typo"]), r"ops='typo'.*'insert', 'delete', 'substitute', 'swap'"),
    (lambda: SynonymReplace(p=0.1, pos=["nouns"]), r"pos='nouns'.*Did you mean 'noun'"),
    (lambda: TextAugment([WordSwap(0.1)], p_apply=2), r"p_apply=2"),
    (lambda: TextAugment([{"_target_": T + "WordDropout", "p": -1}]), r"ops\[0\]: p=-1 is out of range"),
    (lambda: TextAugment([{"_target_": T + "Nope"}]), r"ops\[0\]\._target_=.*Nope"),
    (lambda: TextAugment([42]), r"ops\[0\]=42 must be a text op"),
    (lambda: check_text_transform("data.train_transform", {"ops": []}), r"data\.train_transform must be a \{_target_"),
    (lambda: check_text_transform("data.train_transform", 42), r"data\.train_transform=42"),
    (lambda: WordNetSupersenseDataModule(train_transform=3.0), r"data\.train_transform=3\.0"),
])
def test_bad_options_name_the_option(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


# ------------------------------------------------------------------------------------------------
# datamodule integration (real WordNet, verbs: a 11k-gloss training split keeps WordPiece training ~1 s)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def _dm(tokenizer, cache, transform=None, **kw):
    args = dict(pos=["verb"], tokenizer=tokenizer, vocab_size=300, max_length=12, batch_size=16, limit_train=64, limit_val=24,
                limit_test=20, cache_dir=cache, train_transform=transform)
    dm = WordNetSupersenseDataModule(**{**args, **kw})
    dm.setup()
    return dm


def _batches(loader, seed=0):
    torch.manual_seed(seed)  # the same shuffle order for both loaders
    return list(loader)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@needs_wordnet
@pytest.mark.parametrize("tokenizer", ["raw", "wordpiece"])
def test_datamodule_augments_training_batches_only(tokenizer, tok_cache):
    node = {"_target_": T + "TextAugment", "ops": [{"_target_": T + "WordSwap", "p": 1.0}]}
    aug = _dm(tokenizer, tok_cache, node, limit_train=40)  # 40 < split: a pseudo-label pool exists
    plain = _dm(tokenizer, tok_cache, limit_train=40)
    ref = plain if tokenizer == "raw" else _dm("raw", tok_cache, limit_train=40)  # the batches' raw texts
    assert isinstance(aug.datasets["train"].transform, TextAugment) and plain.datasets["train"].transform is None
    train_texts = aug.texts("train")
    assert train_texts == plain.texts("train") == ref.texts("train")
    swap = WordSwap(1.0)
    pairs = zip(_batches(plain.train_dataloader()), _batches(aug.train_dataloader()), _batches(ref.train_dataloader()),
                strict=True)
    for pb, ab, rb in pairs:
        assert torch.equal(ab["labels"], pb["labels"]) and torch.equal(rb["labels"], pb["labels"])  # same order
        assert ab.keys() == pb.keys()
        assert all(t in train_texts for t in rb["text"])
        want = [swap(t, random.Random(0)) for t in rb["text"]]
        assert want != rb["text"]
        if tokenizer == "raw":
            assert ab["text"] == want
        else:
            # the augmented strings, re-tokenized exactly like the stored ones (truncation, padding, dtypes)
            enc = aug.tokenizer(want, truncation=True, max_length=12, padding="longest", return_tensors="pt",
                                return_token_type_ids=False)
            assert ab["input_ids"].dtype == ab["attention_mask"].dtype == torch.int64
            assert torch.equal(ab["input_ids"], enc["input_ids"]) and torch.equal(ab["attention_mask"], enc["attention_mask"])
            assert not torch.equal(ab["input_ids"], pb["input_ids"]) and ab["input_ids"].shape[1] <= 12
    for split in ("val", "test"):
        loader = getattr(aug, f"{split}_dataloader")()
        for pb, ab in zip(getattr(plain, f"{split}_dataloader")(), loader, strict=True):
            assert _same(pb, ab)
    assert _same(plain.sample_inputs(3), aug.sample_inputs(3))
    pool_p, pool_a = plain.unlabeled_set(), aug.unlabeled_set()
    assert pool_a.transform is None and _same(pool_p.collate([0, 1, 2]), pool_a.collate([0, 1, 2]))
    aug.add_pseudo_labels(torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert aug.datasets["train"].transform is not None  # the grown training set is still augmented


@needs_wordnet
def test_datamodule_fits_switchout_on_training_texts(tok_cache):
    dm = _dm("raw", tok_cache, TextAugment([SwitchOut(tau=2.0)]))
    vocab = dm.datasets["train"].transform.ops[0].vocab
    assert vocab is not None and len(vocab) > 1000  # the whole training split's words, like the tokenizer
    assert {"move", "cause"} <= set(vocab)


@needs_wordnet
@pytest.mark.parametrize("tokenizer", ["raw", "wordpiece"])
def test_seed_everything_makes_augmented_batches_reproducible(tokenizer, tok_cache):
    ops = [WordDropout(0.2), CharNoise(0.3), WordSwap(0.2)] + ([SynonymReplace(0.3)] if os.path.exists(
        f"{WORDNET_DIR}/data.noun") else [])

    def run(seed):
        dm = _dm(tokenizer, tok_cache, TextAugment(ops), num_workers=0)
        L.seed_everything(seed, workers=True, verbose=False)
        return list(dm.train_dataloader())

    a, b, c = run(0), run(0), run(1)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(_same(x, y) for x, y in zip(a, c, strict=True))


def test_text_file_datamodule_takes_a_list_of_ops(tmp_path):
    from lightning_eff.data import TextFileDataModule

    path = tmp_path / "train.jsonl"
    rows = [{"text": f"w{i} x{i} y{i}", "label": i % 2} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kw = dict(train_path=str(path), batch_size=20, val_fraction=0.2, test_fraction=0.2)
    dm, plain = TextFileDataModule(**kw, train_transform=[WordSwap(1.0)]), TextFileDataModule(**kw)
    dm.setup(), plain.setup()
    batch, ref = next(iter(dm.train_dataloader())), next(iter(plain.train_dataloader()))
    assert sorted(batch["text"]) == sorted(WordSwap(1.0)(t, random.Random(0)) for t in dm.texts("train"))
    assert sorted(ref["text"]) == sorted(dm.texts("train"))
    assert next(iter(dm.val_dataloader()))["text"] == next(iter(plain.val_dataloader()))["text"]
    assert "train_transform" not in dm.hparams  # an object, kept out of the saved hyperparameters
