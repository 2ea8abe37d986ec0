"""Tokenizers rebuilt offline from quicktok's BPE ranks reproduce the published token-id vectors
(model-spec.md §5.3) and agree with quicktok itself on a mixed multilingual corpus."""
import random

import pytest

import jv5fast

Q = "Query: How fast does light travel in a vacuum?"
D = "Document: In a vacuum, light travels 299,792,458 metres every second - a universal constant of nature."
SMALL_Q = [2859, 25, 2585, 4937, 1558, 3100, 5821, 304, 264, 28202, 30]
NANO_Q = [2929, 25, 2650, 5043, 1587, 3177, 5944, 304, 264, 29302, 30, 128001]
SMALL_D = [7524, 25, 758, 264, 28202, 11, 3100, 34192, 220, 17, 24, 24, 11, 22, 24, 17, 11, 19, 20, 23, 36256,
           1449, 2086, 481, 264, 20178, 6783, 315, 6993, 13]
NANO_D_TAIL = [7138, 13, 128001]

pytest.importorskip("quicktok")


def test_published_vectors(engines):
    small, nano = engines["small"], engines["nano"]
    assert small.tokenize(Q, prompt="") == SMALL_Q
    assert nano.tokenize(Q, prompt="") == NANO_Q
    assert small.tokenize(D, prompt="") == SMALL_D
    assert nano.tokenize(D, prompt="")[-3:] == NANO_D_TAIL
    # the prompt is plain string concatenation before tokenization
    assert small.tokenize("How fast does light travel in a vacuum?", prompt_name="query") == SMALL_Q
    assert nano.tokenize("How fast does light travel in a vacuum?", prompt_name="query") == NANO_Q


def _corpus(n=150, seed=0):
    rng = random.Random(seed)
    chars = [chr(c) for c in list(range(32, 127)) + list(range(0xA0, 0x250)) + list(range(0x400, 0x450))
             + list(range(0x4E00, 0x4E30)) + [0x1F600, 0x1F680, 0x301, 0x200B, 0x0627, 0x0644, 0x0661]]
    fixed = ["Hello world!! 123456 don't   stop\n\n\tTabs", "日本語のテキストと中文混合 🚀", "e\u0301 NFC", "   lead",
             "x" * 50, "def f(x):\n    return x**2  # c\n", "Привет, как дела?", "ﬁ Å Å", "'S 'LL 're"]
    return fixed + ["".join(rng.choice(chars) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.mark.parametrize("family,kind", [("small", "qwen3"), ("nano", "llama3")])
def test_agrees_with_quicktok(engines, family, kind):
    import quicktok
    enc = quicktok.get_encoding(kind)
    eng = engines[family]
    for text in _corpus(seed=len(kind)):
        want = list(enc.encode_ordinary(text))
        got = eng.tokenize(text, prompt="")
        if family == "nano":
            assert got[-1] == 128001
            got = got[:-1]
        assert got == want, text


def test_special_token_ids(engines):
    tok = engines["nano"].tokenizer._tok
    assert tok.token_to_id("<|end_of_text|>") == 128001
    assert tok.token_to_id("<|mask|>") == 128002 and tok.token_to_id("<|pad|>") == 128004
    assert engines["small"].tokenizer._tok.token_to_id("<|endoftext|>") == 151643


def test_tiny_fallback_tokenizer_works(tmp_path):
    from jv5fast.testing import write_checkpoint
    path = write_checkpoint(str(tmp_path / "t"), "nano", tasks=("retrieval",), real_tokenizer=False)
    eng = jv5fast.Engine(path)
    ids = eng.tokenize("ab", prompt="")
    assert ids == [ord("a"), ord("b"), 128001]
