"""The towers' streams and the joint driver (fastprompt/clip/streams.py): the full and the packed text streams
behind one TextStream protocol give the same features and gradients for the same rows read and replaced, the
image stream is the image tower, run_towers steps both towers around a coupling callback and keeps the prompt
ops out of the towers' profiler scopes; and the package's layering: open_clip's structure is read in
clip/blocks.py and clip/backbone.py only, clip/ reaches the ops through fastprompt.ops, methods/ only public
names of fastprompt.clip."""

import ast
import pathlib
import re

import open_clip
import pytest
import torch

import fastprompt
from fastprompt.clip import (IMAGE_SCOPE, TEXT_SCOPE, ClipBackbone, FullTextStream, ImageStream, PackedTextStream,
                             TextStream, create_clip, make_layout, run_towers)

from ..method_helpers import batch

PACKAGE = pathlib.Path(fastprompt.__file__).parent
M = 3  # prompt rows read and replaced at rows 1..M, as DCP's


@pytest.fixture(scope="module")
def clip():
    return ClipBackbone(create_clip("fastprompt-tiny").double())


def _embeddings(clip, n_classes=4):
    """Token embeddings of sequences sharing SOS and M context rows, then class names of different lengths."""
    tokens = open_clip.tokenize([" ".join(["X"] * M) + f" {name}." for name in ["dog", "sea lion", "a b c d", "x"]
                                 ][:n_classes])
    torch.manual_seed(0)
    emb = clip.token_embeddings(tokens).detach().clone()
    emb[:, 1:1 + M] = torch.randn(M, clip.text_width, dtype=emb.dtype)  # one context for every class
    return emb, clip.eot_index(tokens)


def _streams(clip, emb, eot):
    prefix = 1 + M
    return {"full": FullTextStream(clip, emb, eot),
            "packed": PackedTextStream(clip, emb, make_layout(eot, emb.shape[1])),
            "packed+prefix": PackedTextStream(clip, emb, make_layout(eot, emb.shape[1], prefix))}


def test_both_text_streams_are_text_streams(clip):
    emb, eot = _embeddings(clip)
    for stream in _streams(clip, emb, eot).values():
        assert isinstance(stream, TextStream)
        assert (stream.layer, stream.depth) == (0, clip.text_layers)


def test_the_text_streams_agree_on_rows_read_and_replaced(clip):
    """Before blocks 1 and 2 the rows 1..M are read, transformed by a learnable map and written back (as DCP's
    CMPA does): features and the map's gradient agree across the streams in float64, and equal the tower run
    by open_clip's blocks without rewrites when the map is the identity's neighbour 0."""
    emb, eot = _embeddings(clip)
    results = {}
    for name, stream in _streams(clip, emb, eot).items():
        scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
        seen = []

        def couple(layer, image, text):
            assert image is None and text.layer == layer  # before the block
            if layer in (1, 2):
                rows = text.rows(1, M)
                seen.append(rows.shape[0])
                text.replace(rows * (1 + scale) + scale, 1)

        run_towers(None, stream, couple)
        assert stream.layer == stream.depth
        features = stream.features()
        results[name] = (features, torch.autograd.grad(features.square().sum(), scale)[0], seen)
    want, want_grad, _ = results["full"]
    assert results["full"][2] == [4, 4] and results["packed+prefix"][2] == [1, 1]  # the prefix: one row set
    for name, (features, grad, _) in results.items():
        torch.testing.assert_close(features, want, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12, msg=name)
    plain = clip.encode_text_stream(clip.text_stream(emb), eot)
    torch.testing.assert_close(want.detach(), plain, rtol=1e-10, atol=1e-12)  # scale 0: nothing changes
    assert want_grad.abs() > 0


def test_the_image_stream_is_the_image_tower(clip):
    images, _ = batch()
    x = clip.ln_pre(clip.image_tokens(images.double()))
    stream = ImageStream(clip, x)
    assert stream.rows(None, 2).shape == (3, 2, clip.vision_width)
    torch.testing.assert_close(stream.rows(None, 2), x[:, -2:])
    run_towers(stream, None, lambda layer, image, text: None)
    torch.testing.assert_close(stream.features(), clip.encode_image_stream(x), rtol=1e-12, atol=1e-12)
    # rows written before block 1 equal the stream rewritten by hand and run by the blocks
    torch.manual_seed(1)
    rows = torch.randn(2, clip.vision_width, dtype=torch.float64)
    stream = ImageStream(clip, x)
    run_towers(stream, None, lambda layer, image, text: image.replace(rows) if layer == 1 else None)
    blocks = clip.vision_blocks
    y = blocks[0](x)
    y = torch.cat([y[:, :-2], rows.expand(3, -1, -1)], 1)
    for block in blocks[1:]:
        y = block(y)
    torch.testing.assert_close(stream.features(), clip.image_features(y), rtol=1e-12, atol=1e-12)


def test_run_towers_steps_both_towers_around_the_coupling(clip):
    emb, eot = _embeddings(clip)
    images, _ = batch()
    image = ImageStream(clip, clip.ln_pre(clip.image_tokens(images.double())))
    text = FullTextStream(clip, emb, eot)
    calls = []
    run_towers(image, text, lambda layer, i, t: calls.append((layer, i.layer, t.layer, i is image, t is text)))
    assert calls == [(layer, layer, layer, True, True) for layer in range(clip.vision_layers)]
    with pytest.raises(ValueError, match="every block of this tower has run"):
        text.step()
    with pytest.raises(ValueError, match="no stream to step"):
        run_towers(None, None, lambda *a: None)
    other = FullTextStream(clip, emb, eot)
    other.step()
    with pytest.raises(ValueError, match="steps the towers together, but they have"):
        run_towers(ImageStream(clip, image.x), other, lambda *a: None)


def test_blocks_run_in_their_towers_scopes_and_the_prompt_ops_outside(clip):
    """The profiler scopes a profile of a step is split by (fastprompt.train.bench): each block inside its
    tower's scope, the rows written by the coupling (fastprompt's insertion op) in neither."""
    emb, eot = _embeddings(clip)
    images, _ = batch()
    image = ImageStream(clip, clip.ln_pre(clip.image_tokens(images.double())))
    text = PackedTextStream(clip, emb, make_layout(eot, emb.shape[1], 1 + M))

    def couple(layer, image, text):
        image.replace(image.rows(None, 2))
        text.replace(text.rows(1, M), 1)

    with torch.profiler.profile() as prof:
        run_towers(image, text, couple)
    events = prof.events()
    scopes = [e.name for e in events if e.name in (TEXT_SCOPE, IMAGE_SCOPE)]
    assert scopes.count(TEXT_SCOPE) == clip.text_layers and scopes.count(IMAGE_SCOPE) == clip.vision_layers

    def in_scope(e):
        while e is not None:
            if e.name in (TEXT_SCOPE, IMAGE_SCOPE):
                return True
            e = e.cpu_parent
        return False

    inserts = [e for e in events if e.name.startswith("fastprompt::insert_prompts")]
    assert len(inserts) == 2 * clip.vision_layers and not any(in_scope(e) for e in inserts)
    assert any(in_scope(e) for e in events if e.name == "aten::scaled_dot_product_attention")


# ---- the package's layering ---------------------------------------------------------------------------------

def _sources(folder, skip=()):
    return {p.name: p.read_text() for p in sorted((PACKAGE / folder).glob("*.py")) if p.name not in skip}


# what a block and a tower hold: read in clip/blocks.py (the block adapter) and clip/backbone.py only
OPEN_CLIP_PARTS = re.compile(r"\.(resblocks|attn|in_proj_weight|in_proj_bias|ls_1|ls_2|ln_2|mlp|transformer|"
                             r"ln_final|text_projection|positional_embedding|token_embedding|_text)\b")


def test_open_clips_structure_is_read_in_one_place():
    outside = {**_sources("clip", skip=("blocks.py", "backbone.py", "models.py")),
               **{f"methods/{k}": v for k, v in _sources("methods").items()}}
    found = {name: OPEN_CLIP_PARTS.findall(re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"|\"[^\"\n]*\"", "", src))
             for name, src in outside.items()}
    assert {name: parts for name, parts in found.items() if parts} == {}


def _imports(source):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]


def test_clip_reaches_the_ops_through_fastprompt_ops_and_methods_only_public_clip_names():
    for name, src in _sources("clip").items():
        for level, module, names in _imports(src):
            assert not (level == 2 and module == ""), f"clip/{name} imports {names} from the package face"
    for name, src in _sources("methods").items():
        for level, module, names in _imports(src):
            if level == 2 and module.startswith("clip"):
                assert module == "clip", f"methods/{name} imports from fastprompt.{module}, not fastprompt.clip"
                private = [n for n in names if n.startswith("_")]
                assert not private and set(names) <= set(fastprompt.clip.__all__), (name, names)
