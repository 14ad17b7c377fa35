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


def naive_window_share(x, window):
    """Each entry's share of its window's sum (windows of ``window`` from the first entry; 0: one window)."""
    n = len(x)
    w = window or n
    out = []
    for start in range(0, n, w):
        part = x[start:start + w]
        total = sum(part)
        out += [v / total if total > 0 else 0.0 for v in part]
    return out


@pytest.mark.parametrize("leverage, window", [("kv_product", 16), ("kv_avg", 7), ("key", 0), ("value", 16)])
def test_curdkv_ranks_by_local_key_and_value_energy(gen, leverage, window):
    """Loop: |k|^2 and |v|^2 per token, each as a share of its window (windows from the row's
    first real token), combined, normalised per head; the first 3 tokens always kept."""
    inputs = make_inputs(gen, window=1, pad=(0, 5))
    got = kept_sets(parse(f"curdkv(budget=13, sinks=3, leverage={leverage}, local_window={window})").select(inputs))
    for b in range(2):
        first = int((~inputs.valid[b]).sum())
        for h in range(2):
            k2 = [sum(float(c) ** 2 for c in inputs.keys[b, h, j].double()) for j in range(first, 40)]
            v2 = [sum(float(c) ** 2 for c in inputs.values[b, h, j].double()) for j in range(first, 40)]
            k2, v2 = naive_window_share(k2, window), naive_window_share(v2, window)
            comb = {"kv_product": [a * c for a, c in zip(k2, v2)], "kv_avg": [(a + c) / 2 for a, c in zip(k2, v2)],
                    "key": k2, "value": v2}[leverage]
            row = [c / sum(comb) for c in comb]
            scores = [-math.inf] * first + row
            assert got[b][h] == naive_topk(scores, 13, must=set(range(first, first + 3))), (b, h)


def naive_snapkv_mean(inputs, b, kv, window, kernel):
    """SnapKV's per-token score for one row and KV head, as kvpress: the window's mean attention
    over the tokens before it, zero-padded average pool, mean over the group (float64 loops)."""
    t = inputs.keys.shape[2]
    hq = inputs.queries.shape[1]
    g = hq // inputs.keys.shape[1]
    probs = naive_probs(inputs.queries[b], inputs.keys[b], inputs.valid[b], t - window, inputs.scale)
    n = t - window
    out = [0.0] * n
    for h in range(kv * g, (kv + 1) * g):
        mean = [sum(float(probs[h, i, j]) for i in range(window)) / window for j in range(n)]
        for j in range(n):
            lo, hi = j - kernel // 2, j + kernel // 2
            out[j] += sum(mean[i] for i in range(max(lo, 0), min(hi, n - 1) + 1)) / kernel / g
    return out


def naive_projected_norm(values, out_proj, kv, g):
    """Mean over KV head ``kv``'s query heads of sum_o |sum_c v_c W[o, h*D + c]| per token (float64)."""
    t, d = values.shape[1], values.shape[2]
    w = out_proj.double()
    out = []
    for j in range(t):
        v = values[kv, j].double()
        total = 0.0
        for h in range(kv * g, (kv + 1) * g):
            total += float((w[:, h * d:(h + 1) * d] @ v).abs().sum())
        out.append(total / g)
    return out


@pytest.mark.parametrize("budget", [14, 9])
def test_criticalkv_two_stages_against_a_loop(gen, budget):
    """Loop: stage 1 keeps the int(budget / 2) best SnapKV scores (the window counts as best),
    stage 2 fills the budget by (score + 1e-4) * |v W_o^h|_1 (group mean). At budget 9 stage 1
    (4) is smaller than the window (6): the window stays whole."""
    window = 6
    inputs = make_inputs(gen, window=window, pad=(0, 0))
    hidden = 24
    out_proj = torch.randn(hidden, inputs.queries.shape[1] * 16, generator=gen)
    inputs = ScoreInputs(keys=inputs.keys, values=inputs.values, queries=inputs.queries, valid=inputs.valid,
                         scale=inputs.scale, out_proj=out_proj)
    got = kept_sets(parse(f"criticalkv(budget={budget}, window={window}, kernel=3)").select(inputs))
    for b in range(2):
        for kv in range(2):
            snap = naive_snapkv_mean(inputs, b, kv, window, 3) + [math.inf] * window
            first = naive_topk(snap, budget // 2) | set(range(40 - window, 40))
            norm = naive_projected_norm(inputs.values[b], out_proj, kv, 2)
            weighted = [math.inf if j in first else (snap[j] + 1e-4) * norm[j] for j in range(40)]
            assert got[b][kv] == naive_topk(weighted, budget), (b, kv)
    with pytest.raises(ValueError, match="out_proj"):
        parse("criticalkv(budget=9)").select(make_inputs(gen, window=6))


def test_split_across_layers_exact_counts():
    """Hand-counted splits: proportional shares on top of the reserved window; a capped layer's
    excess goes to the others by preference; integer parts by largest remainder; all kept when
    the budget covers the prompt; zero preferences share equally."""
    from kvplug.budgets.base import split_across_layers

    def split(pref, kept, present, reserved):
        p = torch.tensor(pref, dtype=torch.float32)[:, None]
        return split_across_layers(p, torch.tensor([kept]), torch.tensor([present]), reserved)[:, 0].tolist()

    assert split([1, 1, 2], 10, 20, 2) == [8, 8, 14]  # 24 shared as 6/6/12
    assert split([1, 1, 10], 10, 12, 2) == [9, 9, 12]  # 2/2/20 -> cap 10, excess 10 -> 5/5
    assert split([1, 2], 4, 50, 1) == [3, 5]  # 6 shared as 2/4, on top of 1
    assert split([1, 1, 1], 7, 9, 0) == [7, 7, 7]
    assert split([0, 0], 5, 30, 0) == [5, 5]
    assert split([3, 1], 30, 20, 4) == [20, 20]  # the budget covers the prompt
    assert split([1, 1, 1], 5, 40, 2) == [5, 5, 5]
    assert split([1, 9], 3, 40, 5) == [3, 3]  # the budget is below the reserved window
    assert sum(split([1.0, 2.0, 4.0], 10, 40, 3)) == 30  # 21 shared: 3/6/12 -> exact


def naive_cake(inputs, b, window, kernel, gamma, tau1, tau2):
    """CAKE for one row: (preference, per-KV-head indicator lists), float64 loops."""
    t = inputs.keys.shape[2]
    hq, hkv = inputs.queries.shape[1], inputs.keys.shape[1]
    g = hq // hkv
    probs = naive_probs(inputs.queries[b], inputs.keys[b], inputs.valid[b], t - window, inputs.scale)
    n = t - window
    disp = -sum(float(probs[h, i, j]) * math.log(float(probs[h, i, j]) + 1e-10)
                for h in range(hq) for i in range(window) for j in range(n))
    shift, indicator = 0.0, [[0.0] * n for _ in range(hkv)]
    for h in range(hq):
        raw = []
        for j in range(n):
            col = [float(probs[h, i, j]) for i in range(window)]
            mean = sum(col) / window
            var = sum((c - mean) ** 2 for c in col) / (window - 1)
            shift += var
            raw.append(mean + gamma * var)
        for j in range(n):
            lo, hi = max(j - kernel // 2, 0), min(j + kernel // 2, n - 1)
            indicator[h // g][j] += sum(raw[lo:hi + 1]) / kernel / g
    return disp ** (1 / tau1) * shift ** (1 / tau2), [row + [math.inf] * window for row in indicator]


def test_cake_preference_and_indicator_against_a_loop(gen):
    """One layer: the preference (entropy^(1/tau1) * summed variance^(1/tau2)) and the kept set
    (mean + gamma * variance over the window, pooled, group mean; the window always kept)."""
    inputs = make_inputs(gen, window=5, pad=(0, 0))
    spec = "cake(budget=12, window=5, kernel=3, gamma=50, tau1=0.5, tau2=2)"
    strategy = parse(spec)
    pref = strategy.scorer.layer_preference(inputs)
    scores = strategy.scorer.score(inputs)
    got = kept_sets(strategy.select(inputs, kept=torch.tensor([12, 15])))
    for b, k in enumerate((12, 15)):
        want_pref, indicator = naive_cake(inputs, b, 5, 3, 50.0, 0.5, 2.0)
        assert float(pref[b]) == pytest.approx(want_pref, rel=1e-4)
        for kv in range(2):
            assert got[b][kv] == naive_topk(indicator[kv], k), (b, kv)
            assert scores[b, kv, :35].tolist() == pytest.approx(indicator[kv][:35], rel=1e-4, abs=1e-7)


def naive_unimportant_counts(inputs, b, kv, window, threshold):
    """Per token: how many of the window's queries gave it (group-mean attention) less than
    threshold / (tokens that query sees), float64 loops."""
    t = inputs.keys.shape[2]
    g = inputs.queries.shape[1] // inputs.keys.shape[1]
    probs = naive_probs(inputs.queries[b], inputs.keys[b], inputs.valid[b], t - window, inputs.scale)
    counts = [0] * t
    for i in range(window):
        pos = t - window + i
        seen = [j for j in range(t) if inputs.valid[b, j] and j <= pos]
        for j in seen:
            p = sum(float(probs[h, i, j]) for h in range(kv * g, (kv + 1) * g)) / g
            counts[j] += p < threshold / len(seen)
    return counts


def test_scissorhands_prefill_counts_and_recent_window(gen):
    """Loop: evict the tokens most often below the uniform share over the window's queries; the
    newest floor(budget * ratio) are kept (equal counts: the earlier token is kept)."""
    inputs = make_inputs(gen, window=8, pad=(0, 6))
    got = kept_sets(parse("scissorhands(budget=15, window=8, recent_ratio=0.2, threshold=1.5)").select(inputs))
    for b in range(2):
        for kv in range(2):
            counts = naive_unimportant_counts(inputs, b, kv, 8, 1.5)
            scores = [-counts[j] if inputs.valid[b, j] else -math.inf for j in range(40)]
            assert got[b][kv] == naive_topk(scores, 15, must=set(range(37, 40))), (b, kv)


def naive_chunked_attention(q, k, chunk):
    """Per query head: attention each key gets from its chunk's queries, unscaled logits, float64;
    a partial last chunk padded as the authors' code does (padding keys logit 0, padding queries a
    uniform row over the whole chunk)."""
    s = k.shape[0]
    out = [0.0] * s
    for start in range(0, s, chunk):
        real = list(range(start, min(start + chunk, s)))
        pad = chunk - len(real)
        for i in real:
            logits = [float(q[i] @ k[j]) for j in real] + [0.0] * pad
            m = max(logits)
            e = [math.exp(v - m) for v in logits]
            for c, j in enumerate(real):
                out[j] += e[c] / sum(e)
        for j in real:  # each padding query: a row of zero logits, uniform over the chunk
            out[j] += pad / chunk
    return out


def naive_zscore(xs):
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - mean) / max(std, 1e-6) for x in xs]


@pytest.mark.parametrize("blending", [0.0, 0.7])
def test_compactor_against_a_loop(gen, blending):
    """Loop: non-causal chunked attention x |v|, pooled over 3, z-scored over the layer's heads;
    plus blending x the z-scored leverage diag(X (X^T X + 0.01 I)^-1 X^T) of the centred, sketched
    pre-RoPE keys (the sketch is the scorer's seeded draw, an input here); 2 + 3 sinks kept."""
    from kvplug.rope import Rope

    t, d, chunk = 40, 16, 12
    inputs = make_inputs(gen, t=t, d=d, pad=(0, 4))
    rope = Rope(1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d)))
    inputs = ScoreInputs(keys=inputs.keys, values=inputs.values, queries=inputs.queries, valid=inputs.valid,
                         scale=inputs.scale, rope=rope, layer_idx=1)
    spec = f"compactor(budget=17, sinks_start=2, sinks_end=3, chunk={chunk}, sketch=6, blending={blending}, seed=5)"
    got = kept_sets(parse(spec).select(inputs))
    sketch = torch.randn(2, d, 6, generator=torch.Generator().manual_seed(5 * 1009 + 1)) / math.sqrt(6)
    for b in range(2):
        first = int((~inputs.valid[b]).sum())
        lo, hi = first + 2, t - 3
        attn, lev = [], []
        for kv in range(2):
            k, v = inputs.keys[b, kv, lo:hi].double(), inputs.values[b, kv, lo:hi].double()
            cols = [naive_chunked_attention(inputs.queries[b, h, lo:hi].double(), k, chunk) for h in (2 * kv, 2 * kv + 1)]
            a = [(x + y) / 2 * float(v[j].norm()) for j, (x, y) in enumerate(zip(*cols))]
            attn += [sum(a[max(j - 1, 0):j + 2]) / 3 for j in range(len(a))]
            pos = torch.arange(2, t - first - 3)
            pre = rope.unrotate(inputs.keys[b, kv, lo:hi], pos).double()
            x = (pre - pre.mean(0)) @ sketch[kv].double()
            hat = x @ torch.linalg.inv(x.T @ x + 0.01 * torch.eye(6, dtype=torch.float64)) @ x.T
            lev += [max(float(hat[j, j]), 0.0) for j in range(hi - lo)]
        z = [blending * lv + at for lv, at in zip(naive_zscore(lev), naive_zscore(attn))]
        n = hi - lo
        for kv in range(2):
            scores = [-math.inf] * first + [math.inf] * 2 + z[kv * n:(kv + 1) * n] + [math.inf] * 3
            assert got[b][kv] == naive_topk(scores, 17), (b, kv)
