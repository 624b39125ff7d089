"""Textual Inversion on both text conditioners: placeholder tokens are whole tokens, start
from their init word, change nothing else, train alone, and round-trip through a file."""

import pytest
import torch
from safetensors.torch import save_file
from test_conditioners import small_clip

from ldm.models.conditioners import TransformerTextEncoder
from ldm.models.textual_inversion import (
    add_tokens,
    load_embeddings,
    save_embeddings,
    token_embedding,
    token_vectors,
)


def transformer() -> TransformerTextEncoder:
    torch.manual_seed(0)
    return TransformerTextEncoder(width=32, depth=2, heads=4, pooled=True).eval()


def openclip():
    return small_clip(pooled=True).eval()


MAKERS = pytest.mark.parametrize("make", [transformer, openclip], ids=["scratch", "openclip"])


@MAKERS
def test_placeholder_starts_as_its_init_word_and_changes_nothing_else(make):
    encoder = make()
    captions = ["a photo of a dog", "a red square"]
    with torch.no_grad():
        before = encoder(captions)
    ids = add_tokens(encoder, ["<sks>"], init_words=["dog"])
    assert ids == [49408]  # past CLIP's 49408-word vocabulary
    tokens = encoder.tokenize(["a photo of a <sks>", "<sks><sks>"])
    assert (tokens == 49408).sum(1).tolist() == [1, 2]  # one whole token each, never split
    with torch.no_grad():
        after = encoder(captions)
        placeholder = encoder(["a photo of a <sks>"])
        word = encoder(["a photo of a dog"])
    for key in before:  # captions without the token: bit for bit the same
        assert torch.equal(after[key], before[key])
    # "dog" is one BPE token, so the placeholder starts exactly where the word is, and
    # pooling still reads the EOT state (the new id is larger than EOT's).
    for key in word:
        torch.testing.assert_close(placeholder[key], word[key], rtol=0, atol=1e-6)


@MAKERS
def test_only_the_new_rows_train_and_they_round_trip(make, tmp_path):
    encoder = make()
    add_tokens(encoder, ["<a>", "<b>"], init_words=["cat", "lighthouse"])
    embedding = token_embedding(encoder)
    table = embedding.weight.detach().clone()
    encoder.requires_grad_(False)
    embedding.extra.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding.extra], lr=1e-2, weight_decay=0.01)
    start = embedding.extra.detach().clone()
    for _ in range(3):
        loss = encoder(["a <a> next to a <b>"])["context"].square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(embedding.weight, table)  # the vocabulary is untouched
    assert not torch.equal(embedding.extra, start)

    path = save_embeddings(encoder, tmp_path / "emb.safetensors")
    fresh = make()
    assert load_embeddings(fresh, path) == ["<a>", "<b>"]
    for token, vector in token_vectors(encoder).items():
        assert torch.equal(token_vectors(fresh)[token], vector)
    with torch.no_grad():
        want, got = encoder(["a <b> and a <a>"]), fresh(["a <b> and a <a>"])
    for key in want:
        assert torch.equal(got[key], want[key])


def test_bad_tokens_refused(tmp_path):
    encoder = transformer()
    add_tokens(encoder, ["<x>"], init_words=["cat"])
    with pytest.raises(ValueError, match="already added"):
        add_tokens(encoder, ["<x>"], init_words=["cat"])
    with pytest.raises(ValueError, match="spaces"):
        add_tokens(encoder, ["<y z>"], init_words=["cat"])
    with pytest.raises(ValueError, match="one init word per token"):
        add_tokens(encoder, ["<y>", "<z>"], init_words=["cat"])
    for bad, why in (("<My-Cat>", "never come out"), ("c++", "never come out"), ("*", "break")):
        with pytest.raises(ValueError, match=why):  # lowercased, or a regex character
            add_tokens(encoder, [bad], init_words=["cat"])
    assert encoder.added_tokens == ["<x>"]  # a refused token changes nothing
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an embeddings file"):
        load_embeddings(encoder, tmp_path / "other.safetensors")
