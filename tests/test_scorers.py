"""Each scorer and budget picks the tokens its paper defines: compared with naive loops."""

import math

import pytest
import torch

from kvplug import parse
from kvplug.scorers.base import ScoreInputs


def make_inputs(gen, b=2, hkv=2, group=2, t=40, d=16, window=None, pad=(0, 5)):
    keys = torch.randn(b, hkv, t, d, generator=gen)
    values = torch.randn(b, hkv, t, d, generator=gen)
    queries = torch.randn(b, hkv * group, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    for row, p in enumerate(pad[:b]):
        valid[row, :p] = False  # left padding
    w = t if window is None else window
    return ScoreInputs(keys=keys, values=values, queries=queries[:, :, t - w:], valid=valid, scale=d**-0.5)


def naive_probs(q, k, valid, first, scale):
    """Loop over every query and key, float64."""
    hq, tq, _ = q.shape
    t = k.shape[1]
    out = torch.zeros(hq, tq, t, dtype=torch.float64)
    g = hq // k.shape[0]
    for h in range(hq):
        for i in range(tq):
            logits = [float(q[h, i].double() @ k[h // g, j].double()) * scale
                      if valid[j] and j <= first + i else -math.inf for j in range(t)]
            m = max(logits)
            if m == -math.inf:
                continue
            e = [math.exp(x - m) for x in logits]
            out[h, i] = torch.tensor(e) / sum(e)
    return out


def kept_sets(selection):
    return [[set(selection.indices[b, h, :selection.counts[b, h]].tolist())
             for h in range(selection.indices.shape[1])] for b in range(selection.indices.shape[0])]


def naive_topk(scores, k, must=()):
    """Indices of the k best scores (ties to the earlier index), `must` first."""
    order = sorted(range(len(scores)), key=lambda j: (j not in must, -scores[j], j))
    return set(order[:k])


def test_streaming_keeps_exactly_sinks_and_window(gen):
    inputs = make_inputs(gen, window=1)
    sel = parse("streaming(sinks=3, window=10)").select(inputs)
    for b, heads in enumerate(kept_sets(sel)):
        first = int((~inputs.valid[b]).sum())
        expect = set(range(first, first + 3)) | set(range(40 - 10, 40))
        assert all(h == expect for h in heads)


def test_streaming_short_prompt_keeps_everything(gen):
    inputs = make_inputs(gen, t=12, window=1, pad=(0, 0))
    sel = parse("streaming(sinks=4, window=20)").select(inputs)
    assert all(h == set(range(12)) for heads in kept_sets(sel) for h in heads)


@pytest.mark.parametrize("pool, span", [("avg", "prefix"), ("max", "all"), ("max", "prefix"), ("avg", "all")])
def test_snapkv_matches_naive_loop(gen, pool, span):
    """The authors' scoring (avg, prefix: the default) and the variants, against a float64 loop:
    window attention summed, group mean, pooled over the prefix (zero padding, divided by the
    kernel as ``avg_pool1d`` counts padding) or over every column; the window always kept."""
    w, budget, kernel = 6, 15, 5
    inputs = make_inputs(gen, window=w)
    sel = parse(f"snapkv(budget={budget}, window={w}, kernel={kernel}, pool={pool}, span={span})").select(inputs)
    got = kept_sets(sel)
    n = 40 - w if span == "prefix" else 40
    for b in range(2):
        valid = inputs.valid[b]
        for h in range(2):
            probs = naive_probs(inputs.queries[b], inputs.keys[b], valid, 40 - w, inputs.scale)
            attn = probs[2 * h:2 * h + 2].sum(1).mean(0)  # window sum, group mean
            pooled = []
            for j in range(n):
                near = [attn[i].item() if 0 <= i < n else 0.0 for i in range(j - kernel // 2, j + kernel // 2 + 1)]
                pooled.append(sum(near) / kernel if pool == "avg" else max(x for x, i in zip(
                    near, range(j - kernel // 2, j + kernel // 2 + 1)) if 0 <= i < n))
            scores = [pooled[j] if valid[j] and j < n else -math.inf if not valid[j] else 0.0 for j in range(40)]
            window = set(range(40 - w, 40))
            k = min(budget, int(valid.sum()))
            expect = naive_topk(scores, k, must=window)
            assert got[b][h] == expect


def test_h2o_matches_naive_accumulated_attention(gen):
    inputs = make_inputs(gen)
    sel = parse("h2o(budget=12, recent_ratio=0.25)").select(inputs)
    got = kept_sets(sel)
    for b in range(2):
        valid = inputs.valid[b]
        n = int(valid.sum())
        probs = naive_probs(inputs.queries[b], inputs.keys[b], valid, 0, inputs.scale)
        probs = probs * valid.double()[None, :, None]  # padded queries do not vote
        for h in range(2):
            acc = probs[2 * h:2 * h + 2].sum(1).mean(0)
            recent = set(range(40 - 3, 40))  # floor(12 * 0.25)
            scores = [acc[j].item() if valid[j] else -math.inf for j in range(40)]
            assert got[b][h] == naive_topk(scores, min(12, n), must=recent)


@pytest.mark.parametrize("keep_last", [True, False])
def test_tova_uses_last_query_mean_over_all_heads(gen, keep_last):
    """The last query's attention averaged over every head; the last token kept by default
    (TOVA's code); a budget of 2 so that the last token's own rank decides."""
    inputs = make_inputs(gen, window=1)
    for budget in (9, 2):
        sel = parse(f"tova(budget={budget}, keep_last={keep_last})").select(inputs)
        got = kept_sets(sel)
        for b in range(2):
            valid = inputs.valid[b]
            probs = naive_probs(inputs.queries[b], inputs.keys[b], valid, 39, inputs.scale)
            scores = [probs[:, 0, j].mean().item() if valid[j] else -math.inf for j in range(40)]
            expect = naive_topk(scores, budget, must={39} if keep_last else ())
            assert got[b] == [expect, expect]


def test_knorm_keeps_smallest_norms(gen):
    inputs = make_inputs(gen, window=1)
    sel = parse("knorm(budget=25%)").select(inputs)
    got = kept_sets(sel)
    for b in range(2):
        valid = inputs.valid[b]
        k = math.ceil(0.25 * int(valid.sum()))
        for h in range(2):
            scores = [-inputs.keys[b, h, j].double().norm().item() if valid[j] else -math.inf for j in range(40)]
            assert got[b][h] == naive_topk(scores, k)


def test_random_is_reproducible_and_respects_budget(gen):
    inputs = make_inputs(gen, window=1)
    a = parse("random(budget=7, seed=3)").select(inputs)
    b = parse("random(budget=7, seed=3)").select(inputs)
    assert torch.equal(a.indices, b.indices) and (a.counts == 7).all()
    kept = a.indices[1]  # the padded row: never a padding token
    assert (kept >= 5).all()


def test_pyramid_budgets_decrease_and_average(gen):
    strategy = parse("knorm(budget=20)+pyramid(beta=4)")
    inputs = make_inputs(gen, t=64, window=1, pad=(0, 0))
    counts = []
    for layer in range(5):
        inputs.layer_idx, inputs.num_layers = layer, 5
        counts.append(int(strategy.select(inputs).counts[0, 0]))
    expect = [round(35 - (35 - 5) * layer / 4) for layer in range(5)]  # 2*20-20/4 .. 20/4
    assert counts == expect and sum(counts) == 5 * 20


@pytest.mark.parametrize("alpha, floor", [(0.5, 5), (0.05, 1), (0.0, 0)])
def test_adakv_shares_budget_across_heads_with_floor(gen, alpha, floor):
    """Each head's top floor(alpha * budget) (at least 1 when alpha > 0), then the layer's best."""
    inputs = make_inputs(gen, hkv=4, window=8, pad=(0, 0))
    inputs.keys[:, 3] *= 10  # head 3 ranks below every other: only its floor keeps anything there
    sel = parse(f"knorm(budget=10)+adakv(alpha={alpha})").select(inputs)
    assert (sel.counts[:, 3] == floor).all()
    assert (sel.counts.sum(-1) == 40).all()
    scores = parse("knorm(budget=10)").scorer.score(inputs)
    for b in range(2):
        floor_sets = [naive_topk(scores[b, h].tolist(), floor) for h in range(4)]
        pool = [(scores[b, h, j].item(), h, j) for h in range(4) for j in range(40) if j not in floor_sets[h]]
        pool.sort(key=lambda x: (-x[0], x[1] * 40 + x[2]))
        extra = {(h, j) for _, h, j in pool[:40 - 4 * floor]}
        for h in range(4):
            expect = floor_sets[h] | {j for hh, j in extra if hh == h}
            assert kept_sets(sel)[b][h] == expect


def test_selection_is_in_prompt_order(gen):
    inputs = make_inputs(gen, window=4)
    sel = parse("snapkv(budget=10, window=4)").select(inputs)
    valid = sel.valid()
    for b in range(2):
        for h in range(2):
            idx = sel.indices[b, h][valid[b, h]]
            assert torch.all(idx[1:] > idx[:-1])


def test_simlayerkv_lazy_decision_and_kept_positions_match_naive(gen):
    inputs = make_inputs(gen, t=48, window=6)
    sinks, window = 3, 10
    # naive share: attention of each observation query on the first `sinks` and last `window`
    # valid tokens, averaged over query heads, queries and sequences
    shares = []
    for b in range(2):
        valid = inputs.valid[b]
        first = int((~valid).sum())
        n = int(valid.sum())
        probs = naive_probs(inputs.queries[b], inputs.keys[b], valid, 48 - 6, inputs.scale)
        kept = [j for j in range(48) if valid[j] and (j - first < sinks or j - first >= n - window)]
        shares.append(probs[:, :, kept].sum(-1).mean().item())
    share = sum(shares) / len(shares)
    for threshold, lazy in ((share - 1e-4, True), (min(1.0, share + 1e-4), False)):
        sel = parse(f"simlayerkv(threshold={threshold}, sinks={sinks}, window={window}, obs=6)").select(inputs)
        assert (sel.scorer is not None) == lazy
        for b, heads in enumerate(kept_sets(sel)):
            first = int((~inputs.valid[b]).sum())
            expect = set(range(first, first + sinks)) | set(range(48 - window, 48)) if lazy else set(range(first, 48))
            assert all(h == expect for h in heads)


@pytest.mark.parametrize("covariance, vnorm", [(True, True), (False, False)])
def test_expected_attention_matches_naive_loop(gen, covariance, vnorm):
    """Queries made by rotating known pre-RoPE queries (left padding: positions restart after
    it); a float64 loop takes their mean and covariance after the sinks, rotates them by the mean
    of explicit per-position 2x2 rotations over the next positions, and ranks keys by
    ``softmax(scale k.mu' + scale^2/2 k^T S' k)`` (group mean, times the value norm), sinks kept."""
    from kvplug.rope import Rope

    b, hkv, group, t, d, n_sink, future, budget = 2, 2, 2, 24, 8, 3, 16, 10
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rope = Rope(inv_freq.float())
    pre = torch.randn(b, hkv * group, t, d, generator=gen)
    keys, values = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :5] = False
    pos = torch.where(valid, valid.long().cumsum(-1) - 1, 0)
    queries = rope.rotate(pre, pos[:, None, :])
    inputs = ScoreInputs(keys=keys, values=values, queries=queries, valid=valid, scale=d ** -0.5, rope=rope)
    spec = (f"expected_attention(budget={budget}, n_future={future}, n_sink={n_sink}, use_covariance={covariance}, "
            f"use_vnorm={vnorm})")
    got = kept_sets(parse(spec).select(inputs))

    def rotation(p):
        r = torch.zeros(d, d, dtype=torch.float64)
        for i in range(d // 2):
            c, s = math.cos(p * inv_freq[i].item()), math.sin(p * inv_freq[i].item())
            r[i, i], r[i, i + d // 2], r[i + d // 2, i], r[i + d // 2, i + d // 2] = c, -s, s, c
        return r

    for row in range(b):
        idx = [j for j in range(t) if valid[row, j]]
        length = len(idx)
        stats = [j for j in idx if pos[row, j] >= n_sink]
        rbar = sum(rotation(p) for p in range(length, length + future)) / future
        per_head = []
        for h in range(hkv * group):
            qs = [pre[row, h, j].double() for j in stats]
            mu = sum(qs) / len(qs)
            cov = sum(torch.outer(q - mu, q - mu) for q in qs) / len(qs)
            mu2, cov2 = rbar @ mu, rbar @ cov @ rbar.T
            kv = h // group
            logit = {j: inputs.scale * float(keys[row, kv, j].double() @ mu2)
                     + (inputs.scale ** 2 / 2 * float(keys[row, kv, j].double() @ cov2 @ keys[row, kv, j].double())
                        if covariance else 0.0) for j in stats}
            top = max(logit.values())
            z = sum(math.exp(x - top) for x in logit.values())
            per_head.append({j: math.exp(x - top) / z for j, x in logit.items()})
        for kv in range(hkv):
            scores = []
            for j in range(t):
                if not valid[row, j]:
                    scores.append(-math.inf)
                elif pos[row, j] < n_sink:
                    scores.append(math.inf)
                else:
                    s = sum(per_head[kv * group + g][j] for g in range(group)) / group
                    scores.append(s * values[row, kv, j].double().norm().item() if vnorm else s)
            assert got[row][kv] == naive_topk(scores, budget), (row, kv)


def test_keydiff_keeps_the_keys_least_like_the_mean_direction(gen):
    """Loop: anchor = mean of the valid keys' unit vectors; score = -cos(key, anchor)."""
    inputs = make_inputs(gen, window=1)
    got = kept_sets(parse("keydiff(budget=11)").select(inputs))
    for b in range(2):
        idx = [j for j in range(40) if inputs.valid[b, j]]
        for h in range(2):
            keys = [inputs.keys[b, h, j].double() for j in range(40)]
            anchor = sum(keys[j] / keys[j].norm() for j in idx) / len(idx)
            scores = [-float(keys[j] @ anchor / (keys[j].norm() * anchor.norm())) if j in idx else -math.inf
                      for j in range(40)]
            assert got[b][h] == naive_topk(scores, 11)


def naive_spread(x, own, ref):
    """Per token of ``own``: the sample std over channels of its values min-max normalised by the
    range of the rows ``ref`` (float64 loops)."""
    d = x.shape[1]
    out = []
    for j in own:
        chans = []
        for c in range(d):
            lo, hi = min(float(x[r, c]) for r in ref), max(float(x[r, c]) for r in ref)
            chans.append((float(x[j, c]) - lo) / (hi - lo))
        mean = sum(chans) / d
        out.append(math.sqrt(sum((v - mean) ** 2 for v in chans) / (d - 1)))
    return out


def naive_softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("n, budget", [(40, 28), (20, 12)])
def test_lagkv_ranks_within_partitions_against_the_next(gen, n, budget):
    """Loop: per partition, each token's rank (0..lag-1)/lag by the mean over K and V of
    softmax(std over channels of (x - min_ref) / (max_ref - min_ref)); sinks and the last partition
    plus remainder scored 1; a short prompt (n < sinks + 2 lag) keeps sinks then the newest. At
    40 tokens 16 score 1, so a budget of 28 picks 12 by their ranks."""
    sink, lag = 2, 8
    inputs = make_inputs(gen, t=n, window=1, pad=(0, 3))
    got = kept_sets(parse(f"lagkv(budget={budget}, n_sink={sink}, lag={lag})").select(inputs))
    for b in range(2):
        first = int((~inputs.valid[b]).sum())
        m = n - first
        for h in range(2):
            k, v = inputs.keys[b, h, first:].double(), inputs.values[b, h, first:].double()
            if m < sink + 2 * lag:
                row = [1.0] * sink + [i / (m - sink) for i in range(m - sink)]
            else:
                row = [1.0] * m
                for p in range((m - sink) // lag - 1):
                    own = range(sink + p * lag, sink + (p + 1) * lag)
                    ref = range(sink + (p + 1) * lag, sink + (p + 2) * lag)
                    soft = [naive_softmax(naive_spread(x, own, ref)) for x in (k, v)]
                    mean = [(a + c) / 2 for a, c in zip(*soft)]
                    for r, i in enumerate(sorted(range(lag), key=lambda i: mean[i])):
                        row[own[i]] = r / lag
            scores = [-math.inf] * first + row
            assert got[b][h] == naive_topk(scores, min(budget, m)), (b, h)


def test_chunkkv_keeps_whole_chunks_by_their_mean_score(gen):
    """Loop: chunks of 6 over each row's tokens (remainder a chunk), mean of the head-summed
    knorm scores, the best floor(chunks * 15 / tokens) chunks kept in every head."""
    inputs = make_inputs(gen, window=1, pad=(0, 5))
    got = kept_sets(parse("knorm(budget=15)+chunkkv(chunk=6)").select(inputs))
    for b in range(2):
        first = int((~inputs.valid[b]).sum())
        n = 40 - first
        summed = [sum(-inputs.keys[b, h, first + j].double().norm().item() for h in range(2)) for j in range(n)]
        chunks = [list(range(s, min(s + 6, n))) for s in range(0, n, 6)]
        means = [sum(summed[j] for j in c) / len(c) for c in chunks]
        count = max(1, len(chunks) * 15 // n)
        best = sorted(range(len(chunks)), key=lambda i: (-means[i], i))[:count]
        expect = {first + j for i in best for j in chunks[i]}
        assert got[b] == [expect, expect]
