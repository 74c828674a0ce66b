"""The prompted towers: with no prompts they reproduce open_clip's encode_image / encode_text; token
sequences with slots put every slot where the text says; unsupported towers are named."""

import open_clip
import pytest
import torch

from fastprompt.clip import ClipBackbone, Slot, UnsupportedModelError, create_clip, tokenize_templates


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# the configurations DESIGN.md names (random weights: the layout is what matters, not the values); ViT-L-14
# takes 10 to 30 s on 2 cores (its initialisation and two 24-block forwards), hence `slow`, which CI still runs
@pytest.mark.parametrize("name", ["fastprompt-tiny", "ViT-B-32", "ViT-B-16",
                                  pytest.param("ViT-L-14", marks=pytest.mark.slow)])
def test_towers_without_prompts_equal_open_clip(name):
    model = create_clip(name)
    backbone = ClipBackbone(model)
    size = model.visual.image_size[0]
    images = torch.randn(1, 3, size, size)
    tokens = open_clip.tokenize(["a photo of a dog.", "an airplane", "x"], context_length=backbone.context_length)
    with torch.no_grad():
        assert _rel(backbone.encode_image(images), model.encode_image(images)) < 1e-5
        assert _rel(backbone.encode_text(tokens), model.encode_text(tokens)) < 1e-5


def test_custom_text_clip_is_driven_too():
    model = open_clip.model.CustomTextCLIP(
        32, dict(image_size=32, patch_size=8, width=48, head_width=16, layers=2),
        dict(context_length=77, vocab_size=49408, width=40, heads=5, layers=2), quick_gelu=True).eval()
    backbone = ClipBackbone(model)
    tokens = open_clip.tokenize(["a photo of a cat."])
    with torch.no_grad():
        assert _rel(backbone.encode_text(tokens), model.encode_text(tokens)) < 1e-5
        images = torch.randn(1, 3, 32, 32)
        assert _rel(backbone.encode_image(images), model.encode_image(images)) < 1e-5


def _text_variant(**text_cfg):
    return open_clip.model.CLIP(32, dict(image_size=32, patch_size=8, width=48, head_width=16, layers=1),
                                dict(context_length=77, vocab_size=49408, width=40, heads=5, layers=1, **text_cfg))


def test_a_text_tower_that_is_not_causal_is_refused():
    with pytest.raises(UnsupportedModelError, match="the text tower is not causal"):
        ClipBackbone(_text_variant(no_causal_mask=True))


@pytest.mark.parametrize("pool", ["first", "last"])
def test_a_text_tower_not_pooled_at_eot_is_refused(pool):
    with pytest.raises(UnsupportedModelError, match=f"pools by '{pool}'; only EOT pooling"):
        ClipBackbone(_text_variant(pool_type=pool))


def test_eos_pooling_is_driven_like_open_clip():
    # an end token that is not the largest id, so that pooling by argmax instead would pick another row
    photo = open_clip.tokenizer._tokenizer.encode("photo")[0]
    model = _text_variant(pool_type="eos", eos_id=photo).eval()
    tokens = open_clip.tokenize(["a photo of a cat.", "x photo"])
    with torch.no_grad():
        assert _rel(ClipBackbone(model).encode_text(tokens), model.encode_text(tokens)) < 1e-5


def test_the_frozen_clip_never_trains():
    backbone = ClipBackbone(create_clip())
    assert not any(p.requires_grad for p in backbone.parameters())


def test_slots_land_where_the_text_says():
    templates = [[Slot("ctx", 3), " golden retriever."], ["a photo of a dog.", Slot("p", 2)],
                 ["x-ray ", Slot("ctx", 1), " of X"]]
    tok = tokenize_templates(templates, 77)
    bpe = open_clip.tokenizer._tokenizer
    x = bpe.encode("X")[0]
    assert tok.slot_starts["ctx"].tolist() == [1, 0, 1 + len(bpe.encode("x-ray"))]
    assert tok.slot_starts["p"].tolist()[1] == 1 + len(bpe.encode("a photo of a dog."))
    assert tok.ids[0, 1:4].tolist() == [x] * 3
    expected = open_clip.tokenize(["X X X golden retriever."])[0]
    assert torch.equal(tok.ids[0], expected)  # the same ids as tokenising the whole text
    assert tok.lengths[0] == int((expected != 0).sum())


def test_a_prompt_longer_than_the_context_is_an_error():
    with pytest.raises(ValueError, match="more than the context length 8"):
        tokenize_templates([[Slot("ctx", 4), " a very long class name indeed"]], 8)


def test_a_failed_download_says_how_to_pass_a_local_checkpoint(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(RuntimeError, match="pass its local path as pretrained="):
        create_clip("ViT-B-32", pretrained="openai")


def test_words_decode_back_to_their_text():
    from fastprompt.clip import decode_words, tokenize_words

    ids = tokenize_words("a pixelated photo of a")
    assert decode_words(ids).strip() == "a pixelated photo of a"
    assert tokenize_words(decode_words(ids[1:3]).strip()) == ids[1:3]
