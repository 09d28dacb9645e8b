"""Capture equals a hand-computed, unpadded, one-example-at-a-time reference."""

from __future__ import annotations

import pytest
import torch

from steerable.capture.features import response_means
from steerable.capture.run import batch_examples, capture_stats
from steerable.data.loaders import Example
from steerable.errors import DataError

EXAMPLES = [
    Example("Tell me a story", " Once upon a time", 1, 0),
    Example("Tell me a story", " No.", 0, 0),
    Example("What is two plus two, exactly?", " Four, of course.", 1, 1),
    Example("What is two plus two, exactly?", " I will not say", 0, 1),
    Example("Hi", " Hello there friend", 1, 2),
    Example("Hi", " Go away", 0, 2),
]


def _reference(handle, site: str, layer: int, position: str) -> dict[int, torch.Tensor]:
    """Per-class features, each example run alone (no padding), read with a plain hook."""
    feats: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    module = handle.layout.layers[layer] if site == "resid_post" else handle.layout.attn_in[layer]
    for ex in EXAMPLES:
        prefix = handle.render(ex.prompt)
        full = prefix + ex.response
        special = not handle.has_chat_template
        ids = handle.tokenizer(full, return_tensors="pt", add_special_tokens=special).input_ids
        n_prefix = len(handle.tokenizer(prefix, add_special_tokens=special).input_ids)
        seen: dict[str, torch.Tensor] = {}

        def grab(_m, _a, o, seen=seen):
            seen["h"] = o[0] if isinstance(o, tuple) else o
        hook = module.register_forward_hook(grab)
        with torch.no_grad():
            handle.model(ids)
        hook.remove()
        h = seen["h"][0]
        if position == "last":
            feats[ex.label].append(h[-1:])
        elif position == "response-mean":
            feats[ex.label].append(h[n_prefix:].mean(0, keepdim=True))
        else:
            feats[ex.label].append(h)
    return {c: torch.cat(v) for c, v in feats.items()}


def test_capture_matches_reference(handle):
    for site in ("resid_post", "attn_in"):
        for position in ("last", "response-mean", "all"):
            cap = capture_stats(handle, EXAMPLES, [1, 2], site=site, position=position, batch_size=4,
                                progress=False)
            ref = _reference(handle, site, 2, position)
            st = cap.stats[2]
            # The reservoirs hold every row (well under their capacity): train fold + held-out fold.
            got_pos = torch.cat([st.pos.sample.rows, st.heldout_pos.rows])
            got_neg = torch.cat([st.neg.sample.rows, st.heldout_neg.rows])
            for got, want in ((got_pos, ref[1]), (got_neg, ref[0])):
                assert got.shape == want.shape, (site, position)
                # rows may come in another order (batches are grouped by length): compare sorted sums
                torch.testing.assert_close(got[got.sum(1).argsort()], want[want.sum(1).argsort()],
                                           atol=1e-5, rtol=1e-5)


def test_streaming_means_match_reference(llama):
    # pair 4 (index % 5 == 4) would be held out; with pairs 0-2 everything trains
    cap = capture_stats(llama, EXAMPLES, [3], position="response-mean", batch_size=2, progress=False)
    ref = _reference(llama, "resid_post", 3, "response-mean")
    st = cap.stats[3]
    torch.testing.assert_close(st.pos.mean.float(), ref[1].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.neg.mean.float(), ref[0].mean(0), atol=1e-5, rtol=1e-5)
    assert st.n_pairs == 3
    torch.testing.assert_close((st.diff_total / st.n_pairs).float(), ref[1].mean(0) - ref[0].mean(0),
                               atol=1e-5, rtol=1e-5)


def test_capture_stops_after_last_layer(llama):
    """Layers after the last one read (and the LM head) never run."""
    ran = []
    hooks = [layer.register_forward_hook(lambda _m, _a, _o, i=i: ran.append(i))
             for i, layer in enumerate(llama.layout.layers)]
    head = llama.model.lm_head.register_forward_hook(lambda _m, _a, _o: ran.append("head"))
    capture_stats(llama, EXAMPLES[:2], [1], progress=False)
    for h in [*hooks, head]:
        h.remove()
    assert set(ran) == {0, 1}


def test_batch_examples_keeps_pairs_together_and_covers_every_example():
    examples = [*EXAMPLES, Example("alone", None, 1)]
    batches = batch_examples(examples, 3)
    assert sorted(i for b in batches for i in b.ids) == list(range(len(examples)))
    for b in batches:
        assert b.examples == [examples[i] for i in b.ids]
        assert len(b.examples) <= 3
        pairs = [ex.pair for ex in b.examples if ex.pair is not None]
        assert all(pairs.count(p) == 2 for p in pairs)  # both members of a pair in the same batch


def test_bad_capture_data_raises_data_error(llama):
    with pytest.raises(DataError, match="2 prompts for 1 responses"):
        response_means(llama, ["a", "b"], [" x"], [1], progress=False)
    with pytest.raises(DataError, match=r"responses \[1\] are empty"):
        response_means(llama, ["a", "b"], [" x", "  "], [1], progress=False)
    with pytest.raises(DataError, match="response-mean needs a response for every example"):
        capture_stats(llama, [Example("a", None, 1, 0), Example("b", None, 0, 0)], [1], position="response-mean",
                      progress=False)


