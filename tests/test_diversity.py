"""Stage-1 selectors (`todre.diversity`) against brute-force references written from the maths.

The references use plain Python floats (fp64) and recompute each greedy objective from scratch at
every step. `select_diverse` computes cosines in fp32 with matrix products, so
* two candidates whose objective values differ by less than `TOL` are a near-tie that the two
  precisions may order differently: the reference follows every branch and the test accepts any outcome;
* identical tokens (duplicated or rescaled rows) can differ in the last bit of a matrix product, which
  then decides between them: the reference compares the kept *directions*, not which copy was kept.
Without duplicates and near-ties the kept indices must be identical. Exactly equal computed values go
to the lowest index; the deterministic tests check that on inputs whose cosines are exact.
"""
import itertools, math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from todre.diversity import (OBJECTIVES, PIVOT_STRATEGIES, SELECTORS, grid_pool_indices, pick_pivot,
                             select_diverse, select_tokens)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
TOL = 1e-4

# ---------------------------------------------------------------- brute-force references

def cosine_matrix(feats):
    "Cosine similarity of every pair of rows, in Python floats; a zero row has cosine 0 with everything."
    rows = [[float(v) for v in r] for r in feats.double()]
    norms = [max(math.sqrt(sum(v * v for v in r)), 1e-12) for r in rows]
    return [[sum(a * b for a, b in zip(ri, rj)) / (ni * nj) for rj, nj in zip(rows, norms)]
            for ri, ni in zip(rows, norms)]

def objective_value(cos, v, kept, objective):
    "The greedy criterion of candidate `v` given the kept list, from scratch (maxsum: minimise; kcenter: maximise)."
    if objective == "maxsum": return sum(cos[v][u] for u in kept)
    return min(1 - cos[v][u] for u in kept)

def direction_classes(cos, candidates):
    "Map each candidate to the lowest candidate index with the same direction (identical cosine row)."
    reps, cls = [], {}
    for v in candidates:
        cls[v] = next((r for r in reps if cos[r] == cos[v]), v)
        if cls[v] == v: reps.append(v)
    return cls

def reference_outcomes(cos, candidates, k, pivot, objective):
    """Every greedy outcome, as a sorted tuple of direction classes, when values closer than `TOL` tie.

    Tokens with the same direction are interchangeable for the objective; which copy `select_diverse`
    keeps is decided by the last bit of a matrix product, so the reference tracks directions only.
    Near-ties between different directions (possibly mathematically equal, but computed differently)
    follow every branch."""
    cls = direction_classes(cos, candidates)
    copies = {r: sum(c == r for c in cls.values()) for r in set(cls.values())}
    outcomes, seen = set(), set()
    def extend(kept):
        state = tuple(sorted(kept))                  # the objective depends on the kept multiset only
        if state in seen: return
        seen.add(state)
        assume(len(seen) < 5_000)
        if len(kept) == k: outcomes.add(state); return
        rest = [r for r in sorted(copies) if kept.count(r) < copies[r]]
        f = {r: objective_value(cos, r, kept, objective) for r in rest}
        best = min(f.values()) if objective == "maxsum" else max(f.values())
        for r in rest:
            if abs(f[r] - best) <= TOL: extend(kept + [r])
    extend([cls[pivot]])
    return outcomes, cls

def kept_row(row):
    "Drop the -1 padding of one output row."
    return tuple(int(i) for i in row if i >= 0)

# ---------------------------------------------------------------- hypothesis strategies

@st.composite
def problems(draw, max_n=40, max_d=16, batched=None):
    "A random selection problem: features (with optional exact duplicates / zero rows), masks, pivots, budgets."
    B = draw(st.integers(1, 3))
    n, d = draw(st.integers(1, max_n)), draw(st.integers(1, max_d))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    feats = torch.randn(B, n, d, generator=g)
    if draw(st.booleans()):                                    # exact duplicates and scaled copies: genuine ties
        src, dst = torch.randint(0, n, (2, max(1, n // 4)), generator=g)
        feats[:, dst] = feats[:, src] * draw(st.sampled_from([1.0, 2.0, 0.5]))
    if draw(st.booleans()): feats[:, torch.randint(0, n, (1,), generator=g)] = 0
    feats = feats.to(dtype)
    use_mask = draw(st.booleans())
    mask = torch.rand(B, n, generator=g) < 0.7 if use_mask else torch.ones(B, n, dtype=torch.bool)
    pivots = torch.randint(0, n, (B,), generator=g)
    mask[torch.arange(B), pivots] = True
    counts = mask.sum(1)
    ks = torch.tensor([draw(st.integers(1, int(c))) for c in counts])
    return feats, (mask if use_mask else None), pivots, ks

# ---------------------------------------------------------------- select_diverse

@SETTINGS
@given(problems(), st.sampled_from(OBJECTIVES))
def test_select_diverse_matches_brute_force(problem, objective):
    feats, mask, pivots, ks = problem
    B, n, _ = feats.shape
    out = select_diverse(feats, ks, objective=objective, pivot=pivots, mask=mask)
    assert out.dtype == torch.long and out.shape == (B, int(ks.max()))
    for b in range(B):
        k, row = int(ks[b]), out[b]
        assert (row[k:] == -1).all()
        kept = kept_row(row)
        assert list(kept) == sorted(set(kept)) and len(kept) == k          # ascending, unique, exactly k
        candidates = [v for v in range(n) if mask is None or mask[b, v]]
        outcomes, cls = reference_outcomes(cosine_matrix(feats[b]), candidates, k, int(pivots[b]), objective)
        directions = lambda idx: tuple(sorted(cls[i] for i in idx))
        assert int(pivots[b]) in kept and directions(kept) in outcomes
        if len(outcomes) == 1 and len(set(cls.values())) == len(cls): assert outcomes == {kept}
        # a batch gives what its samples give one by one (a batch may round differently, so where the
        # reference sees a near-tie both calls need only be valid outcomes)
        single = tuple(select_diverse(feats[b], k, objective=objective, pivot=int(pivots[b]),
                                      mask=None if mask is None else mask[b]).tolist())
        assert directions(single) in outcomes
        if len(outcomes) == 1 and len(set(cls.values())) == len(cls): assert single == kept

@SETTINGS
@given(problems(max_n=30, max_d=8), st.sampled_from(OBJECTIVES))
def test_select_diverse_uniform_budget_and_shared_inputs(problem, objective):
    feats, mask, pivots, ks = problem
    k = int(ks.min())
    shared_mask = None if mask is None else mask.all(0)
    assume(shared_mask is None or (shared_mask.sum() >= k and shared_mask[pivots[0]]))
    out = select_diverse(feats, k, objective=objective, pivot=int(pivots[0]), mask=shared_mask)
    assert out.shape == (feats.shape[0], k)
    per_sample = select_diverse(feats, torch.full_like(ks, k), objective=objective,
                                pivot=pivots[:1].expand(len(ks)), mask=shared_mask)
    assert torch.equal(out, per_sample)
    assert (out.diff(dim=1) > 0).all()

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_input_dtype_only_changes_storage(objective):
    x = torch.randn(4, 60, 24).bfloat16()
    ref = select_diverse(x.float(), 12, objective=objective)
    assert torch.equal(select_diverse(x, 12, objective=objective), ref)
    assert torch.equal(select_diverse(x.double(), 12, objective=objective), ref)
    assert torch.equal(select_diverse(x.half(), 12, objective=objective), ref)

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ties_go_to_lowest_index(objective):
    same = torch.ones(7, 3)
    assert select_diverse(same, 3, objective=objective).tolist() == [0, 1, 2]
    assert select_diverse(same, 3, objective=objective, pivot=5).tolist() == [0, 1, 5]
    zeros = torch.zeros(2, 5, 4)                           # cosine 0, never NaN
    assert select_diverse(zeros, 4, objective=objective).tolist() == [[0, 1, 2, 3]] * 2
    x = torch.tensor([[1., 0], [0, 1], [1, 0], [0, 1], [-1, 0]])
    assert select_diverse(x, 2, objective=objective).tolist() == [0, 4]
    assert select_diverse(x, 3, objective=objective).tolist() == [0, 1, 4]

def test_scale_invariance_and_trivial_budgets():
    x = torch.randn(2, 30, 5)
    scaled = x * torch.rand(2, 30, 1).add(0.05)
    for objective in OBJECTIVES:
        assert torch.equal(select_diverse(x, 9, objective=objective), select_diverse(scaled, 9, objective=objective))
        assert select_diverse(x, 1, objective=objective, pivot=torch.tensor([3, 8])).tolist() == [[3], [8]]
        assert torch.equal(select_diverse(x, 30, objective=objective), torch.arange(30).expand(2, 30))

def test_per_sample_budget_padding():
    x = torch.randn(4, 12, 6)
    ks = torch.tensor([3, 1, 12, 5])
    out = select_diverse(x, ks, pivot=torch.tensor([0, 11, 4, 2]))
    assert out.shape == (4, 12)
    for b, k in enumerate(ks.tolist()):
        assert out[b, k:].tolist() == [-1] * (12 - k)
        assert torch.equal(out[b, :k], select_diverse(x[b], k, pivot=[0, 11, 4, 2][b]))
    # a per-sample tensor with equal entries gives the uniform-budget result
    assert torch.equal(select_diverse(x, torch.tensor([4] * 4)), select_diverse(x, 4))
    assert torch.equal(select_diverse(x[0], torch.tensor(4)), select_diverse(x[0], 4))

def test_linear_memory_in_n():
    # an n x n similarity matrix would need 3.6 GB here
    x = torch.randn(30_000, 8)
    out = select_diverse(x, 5)
    assert out.shape == (5,) and out[0] == 0

def chordal(x):
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    return torch.cdist(u, u)

@SETTINGS
@given(st.integers(2, 9), st.integers(2, 5), st.integers(0, 2**31 - 1), st.data())
def test_kcenter_is_a_2_approximation(n, d, seed, data):
    "Greedy covering radius <= 2 x the optimal radius, in the chordal metric on the unit sphere."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    mask = torch.rand(n, generator=g) < 0.8 if data.draw(st.booleans()) else torch.ones(n, dtype=torch.bool)
    pivot = data.draw(st.integers(0, n - 1)); mask[pivot] = True
    candidates = mask.nonzero()[:, 0].tolist()
    k = data.draw(st.integers(1, len(candidates)))
    dist = chordal(x)[candidates][:, candidates]
    pos = {v: i for i, v in enumerate(candidates)}
    kept = [pos[v] for v in select_diverse(x, k, objective="kcenter", pivot=pivot, mask=mask).tolist()]
    greedy = dist[:, kept].min(1).values.max().item()
    subsets = torch.tensor(list(itertools.combinations(range(len(candidates)), k)))      # every k-subset
    optimum = dist[:, subsets].min(2).values.max(0).values.min().item()
    assert greedy <= 2 * optimum + 1e-9

def test_kcenter_picks_are_farthest_first_in_the_chordal_metric():
    x = torch.randn(25, 6, generator=torch.Generator().manual_seed(1))
    dist, kept = chordal(x), [0]
    while len(kept) < 8:
        kept.append(int(dist[:, kept].min(1).values.argmax()))
    assert select_diverse(x, 8, objective="kcenter").tolist() == sorted(kept)

# ---------------------------------------------------------------- errors

X = torch.randn(8, 4)
XB = torch.randn(3, 8, 4)

@pytest.mark.parametrize("call, message", [
    (lambda: select_diverse(X, 0), "`k` must be positive"),
    (lambda: select_diverse(X, -2), "`k` must be positive"),
    (lambda: select_diverse(XB, torch.tensor([2, 0, 1])), "`k` must be positive"),
    (lambda: select_diverse(X, 9), "larger than the number of candidates (8)"),
    (lambda: select_diverse(XB, torch.tensor([2, 3, 4]), mask=torch.arange(8) < 3), "candidates (3 in sample 2)"),
    (lambda: select_diverse(X, 2.0), "`k` must be an int"),
    (lambda: select_diverse(X, True), "`k` must be an int"),
    (lambda: select_diverse(X, torch.tensor([2.0])), "`k` must be an int"),
    (lambda: select_diverse(X, torch.tensor([2, 2])), "`k` must be an int or 0-d tensor"),
    (lambda: select_diverse(XB, torch.tensor([2, 2])), "`k` must be an int or a (3,) tensor"),
    (lambda: select_diverse(X, 2, pivot=8), "`pivot` must lie in [0, 8)"),
    (lambda: select_diverse(X, 2, pivot=-1), "`pivot` must lie in [0, 8)"),
    (lambda: select_diverse(XB, 2, pivot=torch.tensor([0, 9, 1])), "`pivot` must lie in [0, 8)"),
    (lambda: select_diverse(XB, 2, pivot=torch.tensor([0, 1])), "`pivot` must be an int or a (3,) tensor"),
    (lambda: select_diverse(X, 2, pivot=6, mask=torch.arange(8) < 4), "must be a candidate"),
    (lambda: select_diverse(X, 2, objective="maxmin"), "unknown objective 'maxmin'; valid: maxsum, kcenter"),
    (lambda: select_diverse(X.long(), 2), "floating-point"),
    (lambda: select_diverse(X.bool(), 2), "floating-point"),
    (lambda: select_diverse(X[0], 1), "shape (n, d) or (B, n, d)"),
    (lambda: select_diverse(XB[None], 1), "shape (n, d) or (B, n, d)"),
    (lambda: select_diverse(X.numpy(), 1), "must be a torch.Tensor"),
    (lambda: select_diverse(X, 2, mask=torch.ones(8)), "bool tensor"),
    (lambda: select_diverse(X, 2, mask=torch.ones(3, 8, dtype=torch.bool)), "`mask` must have shape (8,)"),
    (lambda: select_diverse(XB, 2, mask=torch.ones(2, 8, dtype=torch.bool)), "(8,) or (3, 8)"),
    (lambda: pick_pivot(X), "needs `cls_attn`"),
    (lambda: pick_pivot(cls_attn=torch.rand(8), strategy="center"), "needs `feats`"),
    (lambda: pick_pivot(cls_attn=torch.rand(8), strategy="farthest"), "needs `feats`"),
    (lambda: pick_pivot(X, strategy="middle"), "valid: cls, random, center, farthest"),
    (lambda: pick_pivot(strategy="random"), "give `feats` or `cls_attn`"),
    (lambda: pick_pivot(X, torch.rand(7)), "`cls_attn` must have shape (8,)"),
    (lambda: pick_pivot(X, torch.arange(8)), "`cls_attn` must be a floating-point tensor"),
    (lambda: pick_pivot(X, strategy="random", mask=torch.zeros(8, dtype=torch.bool)), "no candidate"),
    (lambda: select_tokens("diverse", X, 2), "valid: maxsum, kcenter, cls_topk, random, pool"),
    (lambda: select_tokens("cls_topk", X, 2), "needs `cls_attn`"),
    (lambda: select_tokens("maxsum", X, 2), "needs `cls_attn`"),
    (lambda: select_tokens("pool", X, 2, grid=(3, 3)), "h*w == n == 8"),
    (lambda: select_tokens("random", X, 0), "`k` must be positive"),
    (lambda: select_tokens("pool", XB, 9), "larger than the number of candidates"),
    (lambda: select_tokens("cls_topk", XB, 2, cls_attn=torch.rand(2, 8)), "`cls_attn` must have shape (3, 8)"),
    (lambda: grid_pool_indices(2, 3, 7), "must lie in [1, 6]"),
])
def test_clear_errors(call, message):
    with pytest.raises(ValueError) as err: call()
    assert message in str(err.value)

# ---------------------------------------------------------------- pick_pivot

def test_pick_pivot_cls():
    attn = torch.rand(3, 10)
    assert torch.equal(pick_pivot(cls_attn=attn), attn.argmax(1))
    assert pick_pivot(cls_attn=attn[0]).shape == ()
    assert pick_pivot(cls_attn=attn[0]) == attn[0].argmax()
    mask = torch.arange(10) >= 5                                  # e.g. only the AnyRes thumbnail
    assert torch.equal(pick_pivot(torch.randn(3, 10, 4), attn, mask=mask), attn[:, 5:].argmax(1) + 5)

def test_pick_pivot_random_is_seeded_and_uniform_over_candidates():
    mask = torch.tensor([False, True, True, False, True, True])
    picks = [int(pick_pivot(torch.randn(6, 3), strategy="random", mask=mask, seed=s)) for s in range(400)]
    assert set(picks) == {1, 2, 4, 5}
    counts = [picks.count(i) for i in (1, 2, 4, 5)]
    assert min(counts) > 60 and max(counts) < 140                 # 100 expected each
    a = pick_pivot(XB, strategy="random", seed=7)
    assert a.shape == (3,) and torch.equal(a, pick_pivot(XB, strategy="random", seed=7))
    assert torch.equal(pick_pivot(cls_attn=torch.rand(3, 8), strategy="random", seed=7), a)  # only the layout matters

@pytest.mark.parametrize("strategy", ["center", "farthest"])
def test_pick_pivot_center_and_farthest_match_brute_force(strategy):
    x = torch.randn(4, 15, 5, dtype=torch.float64)
    mask = torch.rand(4, 15) < 0.6; mask[:, 3] = True
    out = pick_pivot(x, strategy=strategy, mask=mask)
    for b in range(4):
        cands = [v for v in range(15) if mask[b, v]]
        cos = cosine_matrix(torch.cat([x[b, cands], x[b, cands].mean(0, keepdim=True)]))
        to_mean = [row[-1] for row in cos[:-1]]
        best = (max if strategy == "center" else min)(range(len(cands)), key=to_mean.__getitem__)
        assert int(out[b]) == cands[best]
        assert out[b] == pick_pivot(x[b], strategy=strategy, mask=mask[b])

# ---------------------------------------------------------------- select_tokens

@SETTINGS
@given(problems(max_n=30, max_d=4), st.sampled_from(SELECTORS), st.booleans())
def test_every_selector_keeps_exactly_k_ascending_candidates(problem, method, use_grid):
    feats, mask, pivots, ks = problem
    B, n, _ = feats.shape
    attn = torch.rand(B, n)
    grid = next(((h, n // h) for h in range(int(math.sqrt(n)), 0, -1) if n % h == 0)) if use_grid else None
    out = select_tokens(method, feats, ks, cls_attn=attn, mask=mask, grid=grid, pivot=pivots)
    assert out.shape == (B, int(ks.max())) and out.dtype == torch.long
    for b in range(B):
        k = int(ks[b])
        kept = kept_row(out[b])
        assert len(kept) == k and list(kept) == sorted(set(kept)) and (out[b, k:] == -1).all()
        assert mask is None or mask[b, list(kept)].all()

def test_select_tokens_diversity_methods_delegate():
    attn = torch.rand(3, 8)
    for method in OBJECTIVES:
        for strategy in PIVOT_STRATEGIES:
            piv = pick_pivot(XB, attn, strategy, seed=4)
            assert torch.equal(select_tokens(method, XB, 3, cls_attn=attn, pivot=strategy, seed=4),
                               select_diverse(XB, 3, objective=method, pivot=piv))
        assert torch.equal(select_tokens(method, X, 3, pivot=5), select_diverse(X, 3, objective=method, pivot=5))

def test_cls_topk_equals_torch_topk():
    attn = torch.rand(4, 50)
    out = select_tokens("cls_topk", torch.randn(4, 50, 3), 7, cls_attn=attn)
    assert torch.equal(out, attn.topk(7).indices.sort().values)
    mask = torch.rand(4, 50) < 0.5; mask[:, :7] = True
    out = select_tokens("cls_topk", torch.randn(4, 50, 3), 7, cls_attn=attn, mask=mask)
    assert torch.equal(out, attn.masked_fill(~mask, -1).topk(7).indices.sort().values)

def test_random_is_seeded_uniform_without_replacement():
    x = torch.randn(2, 10, 3)
    a = select_tokens("random", x, 4, seed=11)
    assert torch.equal(a, select_tokens("random", x, 4, seed=11))
    assert len({tuple(select_tokens("random", x[0], 4, seed=s).tolist()) for s in range(20)}) > 10
    hits = torch.zeros(10)
    for s in range(500): hits[select_tokens("random", x[0], 3, seed=s)] += 1
    assert hits.min() > 100 and hits.max() < 200                 # 150 expected each

def covering_radius(h, w, kept):
    r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
    kept = torch.as_tensor(kept)
    return torch.maximum((r[:, None] - r[kept]).abs(), (c[:, None] - c[kept]).abs()).min(1).values.max().item()

def test_pool_on_a_grid_is_exact_and_spatially_spread():
    assert grid_pool_indices(24, 24, 144) == [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]
    assert grid_pool_indices(4, 4, 16) == list(range(16))
    for h, w in [(6, 6), (5, 9), (12, 7), (24, 24)]:
        for k in range(1, h * w + 1, max(1, h * w // 40)):
            kept = grid_pool_indices(h, w, k)
            assert len(kept) == k and kept == sorted(set(kept))
            assert covering_radius(h, w, kept) <= 1 + 1.25 * math.sqrt(h * w / k)
    out = select_tokens("pool", torch.randn(2, 24 * 24, 3), torch.tensor([144, 64]), grid=(24, 24))
    assert out[0].tolist() == grid_pool_indices(24, 24, 144)
    assert out[1, :64].tolist() == grid_pool_indices(24, 24, 64)

def test_pool_without_grid_is_evenly_spaced_over_candidates():
    assert select_tokens("pool", torch.randn(10, 2), 5).tolist() == [1, 3, 5, 7, 9]
    assert select_tokens("pool", torch.randn(9, 2), 9).tolist() == list(range(9))
    mask = torch.tensor([True, False] * 6)                       # candidates 0, 2, ..., 10
    assert select_tokens("pool", torch.randn(12, 2), 3, mask=mask).tolist() == [2, 6, 10]
    # a sample whose mask breaks the grid falls back to the sequence rule
    m = torch.ones(2, 16, dtype=torch.bool); m[1, 12:] = False
    out = select_tokens("pool", torch.randn(2, 16, 2), 4, mask=m, grid=(4, 4))
    assert out[0].tolist() == grid_pool_indices(4, 4, 4) and out[1].tolist() == [1, 4, 7, 10]


def test_exact_copies_tie_by_index_whatever_the_batch():
    "Tokens that are exact copies of each other (LLaVA-NeXT's newline tokens) get one score: the lowest index wins, alone or in a batch."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g)
    x[::25] = torch.randn(64, generator=g)                 # 12 identical tokens
    other = torch.randn(300, 64, generator=g)
    for objective in ("maxsum", "kcenter"):
        alone = select_diverse(x, 40, objective=objective, pivot=3)
        batched = select_diverse(torch.stack([other, x]), 40, objective=objective, pivot=3)[1]
        assert torch.equal(alone, batched)
        picked = [i for i in alone.tolist() if i % 25 == 0]
        assert picked == sorted(picked) and (not picked or picked[0] == 0)
